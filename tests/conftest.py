"""Shared fixtures. The suite never touches the real Hub: a loopback Hub (tests/hub_server.py) is started and
HF_ENDPOINT points at it before any HuggingFace library is imported (they read the environment at import time),
so every Hub call, intended or accidental, is answered on 127.0.0.1. HF_HOME is private to the run."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hub_server import LoopbackHub

HUB = LoopbackHub()
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_HUB_DISABLE_XET"] = "1"  # otherwise large files would go through Xet storage
os.environ["HF_TOKEN"] = "hf_loopback_test_token"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_zoo_rnn_tests_hf_home_")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hf_zoo_rnn import ZooRnnConfig  # noqa: E402

LICENSE_TEXT = "/usr/share/common-licenses/Apache-2.0"


def small_config(**overrides) -> ZooRnnConfig:
    values = dict(vocab_size=64, embedding_size=16, num_heads=3, head_dim=8, chunk_size=5)
    values.update(overrides)
    return ZooRnnConfig(**values)


@pytest.fixture
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds on a licence text that every Debian machine has."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    with open(LICENSE_TEXT, encoding="utf-8") as handle:
        tokenizer.train_from_iterator([handle.read()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "tiny_model.yaml"
# pure ZO as the tests were written for it: ZO-Adam at lr 0.01, cosine after 20 warm-up steps
PROBES = ["--estimator", "probes", "--zo_lr", "0.01", "--zo_update_rule", "adam", "--zo_lr_schedule", "cosine"]
PROBES += ["--zo_warmup_steps", "20"]
# trainer arguments small enough for CI: 2 x 32-token blocks, pure ZO with 4 probes, a 300-token BPE trained on 50K
# characters
FAST_TRAINING = [*PROBES, "--model_config", str(TINY_MODEL), "--batch_size", "2", "--context_length", "32"]
FAST_TRAINING += ["--zo_num_probes", "4", "--tokenizer_vocab_size", "300", "--tokenizer_sample_chars", "50000"]
FAST_TRAINING += ["--eval_batches", "1", "--logging_steps", "1", "--checksum_steps", "1"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run scripts/<name> in a fresh interpreter; a non-zero exit raises CalledProcessError."""
    command = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)


def train_losses(output_dir: Path) -> list[float]:
    """The train loss of every logged step of a finished run."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["train_loss"] for record in map(json.loads, lines) if "train_loss" in record]


def train_add_model(out: Path, max_steps: int) -> Path:
    """A char LSTM trained for a few seconds on `add` with labels: a starting point for training on rewards."""
    from accelerate.state import AcceleratorState

    from hf_zoo_rnn.training import ZooTrainer, parse_arguments

    AcceleratorState._reset_state(reset_partial_state=True)
    args = ["--output_dir", str(out), "--task", "add", "--tokenizer", "char", "--model_config", str(TINY_MODEL)]
    args += ["--max_steps", str(max_steps), "--batch_size", "16"]
    args += ["--log_with", "none", "--eval_steps", "0", "--save_steps", "0"]
    ZooTrainer(*parse_arguments(args)).train()
    return out
