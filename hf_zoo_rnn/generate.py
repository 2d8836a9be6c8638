"""Continue a prompt with a trained model (a local folder or a Hub repo).

hf-zoo-rnn-generate --model outputs/default --prompt "In the beginning" [--max_new_tokens 80]
                           [--do_sample --temperature 0.8 --top_k 40 | --num_beams 4]
"""

from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from hf_zoo_rnn.config_files import command_name
from hf_zoo_rnn.data import unknown_spans
from hf_zoo_rnn.hub import ModelReferenceError, load_trained


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "trained folder or Hub repo id"})
    prompt: str = field(default="In the beginning", metadata={"help": "text to continue (empty: a new document)"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens to generate"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy/beam search"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample from the k most likely tokens"})
    num_beams: int = field(default=1, metadata={"help": "beam search width"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def main() -> None:
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses()
    if args.max_new_tokens < 1:
        raise SystemExit(f"{command_name()}: --max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise SystemExit(f"{command_name()}: --num_beams must be at least 1, got {args.num_beams}")
    if args.do_sample and (args.temperature <= 0 or args.top_k < 0):
        raise SystemExit(
            f"{command_name()}: sampling needs --temperature > 0 and --top_k >= 0, got {args.temperature} and {args.top_k}"
        )
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_trained(args.model)
    except ModelReferenceError as error:
        raise SystemExit(f"{command_name()}: {error}") from None
    unknown = unknown_spans(tokenizer, args.prompt)
    if unknown:
        listed = ", ".join(repr(piece) for piece in dict.fromkeys(unknown))
        raise SystemExit(f"{command_name()}: the prompt has text outside {args.model}'s vocabulary: {listed}")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:  # an empty prompt: generate a document from its start
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]])
    output = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        num_beams=args.num_beams,
        pad_token_id=tokenizer.pad_token_id,
    )
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
