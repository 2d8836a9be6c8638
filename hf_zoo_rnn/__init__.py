"""hf_zoo_rnn: FlashRNN LSTM/GRU language models in transformers, trained with zero-order optimisation."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_zoo_rnn import ZooRnnConfig
from .modeling_zoo_rnn import ZooRnnForCausalLM, ZooRnnModel, ZooRnnPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(ZooRnnConfig.model_type, ZooRnnConfig, exist_ok=True)
AutoModel.register(ZooRnnConfig, ZooRnnModel, exist_ok=True)
AutoModelForCausalLM.register(ZooRnnConfig, ZooRnnForCausalLM, exist_ok=True)
# save_pretrained then copies the two model files next to the weights and writes `auto_map` (Hub remote code).
ZooRnnConfig.register_for_auto_class()
ZooRnnModel.register_for_auto_class("AutoModel")
ZooRnnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ESConfig", "ESTrainer", "ZooRnnConfig", "ZooRnnForCausalLM", "ZooRnnModel", "ZooRnnPreTrainedModel"]


def __getattr__(name: str):
    """ESConfig and ESTrainer on first use: importing the model does not import the trainer's stack."""
    if name == "ESConfig":
        from .training.es_config import ESConfig

        return ESConfig
    if name == "ESTrainer":
        from .training.es_trainer import ESTrainer

        return ESTrainer
    raise AttributeError(f"module 'hf_zoo_rnn' has no attribute {name!r}")
