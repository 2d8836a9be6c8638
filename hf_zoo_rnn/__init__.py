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

__all__ = ["ZooRnnConfig", "ZooRnnForCausalLM", "ZooRnnModel", "ZooRnnPreTrainedModel"]
