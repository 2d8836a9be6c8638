"""Push a trained output folder (model, tokenizer, card, loss curve) to the Hub, with retries.

hf-zoo-rnn-push --folder outputs/default --repo_id you/zoo-lstm [--private] [--include_checkpoints]
"""

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from transformers import HfArgumentParser

from hf_zoo_rnn.hub import push_folder
from hf_zoo_rnn.training.checkpoints import CONFIG_NAME


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "a training output folder"})
    repo_id: str = field(metadata={"help": "owner/name of the model repo"})
    private: bool = field(default=False, metadata={"help": "create the repo private"})
    include_checkpoints: bool = field(
        default=False, metadata={"help": "also push checkpoint-*/ with their resume state"}
    )
    token: str | None = field(default=None, metadata={"help": "token (default: HF_TOKEN or the saved login)"})
    retries: int = field(default=5, metadata={"help": "retries with exponential back-off"})


def main() -> None:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses()
    folder = Path(args.folder)
    if not (folder / CONFIG_NAME).is_file():
        raise SystemExit(f"{folder} has no {CONFIG_NAME}: not a trained output folder")
    ignore = [".tmp-*/*", ".hub-push-*/*", "tokenizer/*", "hf_zoo_rnn/*"]
    if not args.include_checkpoints:
        ignore.append("checkpoint-*/*")
    url = push_folder(
        HfApi(token=args.token),
        folder,
        args.repo_id,
        args.private,
        f"Upload {folder.name}",
        ignore_patterns=ignore,
        retries=args.retries,
    )
    print(url)


if __name__ == "__main__":
    main()
