"""Build a ZooRnn LM from a model config, run a forward with a loss, and generate: the model's path end to end.

python scripts/demo.py [--model_config configs/model/tiny.yaml] [--prompt_length 16] [--max_new_tokens 32]
"""

from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from hf_zoo_rnn import ZooRnnForCausalLM
from hf_zoo_rnn.config_files import load_model_config


@dataclass
class DemoArguments:
    model_config: str = field(default="configs/model/tiny.yaml", metadata={"help": "a YAML file in configs/model"})
    prompt_length: int = field(default=16, metadata={"help": "random prompt tokens"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens to generate"})
    seed: int = field(default=0, metadata={"help": "torch seed for init and prompt"})


def main() -> None:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    torch.manual_seed(args.seed)
    model = ZooRnnForCausalLM(load_model_config(args.model_config)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length))
    with torch.inference_mode():
        loss = model(prompt, labels=prompt).loss
        generated = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"{model.num_parameters():,} parameters, {model.config.cell} x {model.config.num_hidden_layers} layer(s)")
    print(
        f"loss of an untrained model on random tokens: {loss.item():.3f} (uniform: {torch.log(torch.tensor(float(model.config.vocab_size))):.3f})"
    )
    print(f"generated ids: {generated[0, args.prompt_length :].tolist()}")


if __name__ == "__main__":
    main()
