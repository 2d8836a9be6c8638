"""The Hub, against the loopback server of conftest.py driven by the real huggingface_hub / transformers clients."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING, HUB, run_script
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from test_training import run
from transformers import AutoModelForCausalLM, AutoTokenizer

PUSH = ["--push_to_hub", "--hub_retries", "3", "--hub_retry_seconds", "0.05", "--log_with", "none", "--eval_steps", "0"]


def train_and_push(output_dir, repo_id: str, *extra: str) -> dict:
    """A one-step training run that pushes its final model to `repo_id` at the end."""
    return run([
        "--output_dir", str(output_dir), *FAST_TRAINING, *PUSH, "--max_steps", "1", "--save_steps", "0",
        "--hub_strategy", "end", "--hub_model_id", repo_id, *extra,
    ])  # fmt: skip


def commits(repo_id: str) -> list[dict]:
    return HUB.state.repos[repo_id]


def test_push_then_from_pretrained_round_trip_with_tokenizer_and_card(tmp_path):
    out = tmp_path / "run"
    train_and_push(out, "tester/round-trip", "--max_steps", "2")
    files = HfApi().list_repo_files("tester/round-trip")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "loss_curve.png",
        "modeling_zoo_rnn.py",
    ):
        assert name in files, name
    assert not any(f.startswith(("checkpoint-", "tokenizer/")) for f in files)
    model = AutoModelForCausalLM.from_pretrained("tester/round-trip")
    local = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert torch.equal(model(ids).logits, local(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained("tester/round-trip")
    assert tokenizer("In the beginning").input_ids == AutoTokenizer.from_pretrained(out)("In the beginning").input_ids
    card = ModelCard.load("tester/round-trip")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"custom_code", "lstm", "zeroth-order", "flashrnn"} <= set(card.data.tags)
    for fact in (
        "probes per step | 4",
        "forward passes | 16",
        "tokens seen | 128",
        "eval_loss",
        "loss_curve.png",
        "1 process(es) on CPU",
        "peak memory",
    ):
        assert fact in card.text, fact


def test_every_save_pushes_each_checkpoint_and_all_checkpoints_resume_from_the_hub(tmp_path):
    run(
        [
            "--output_dir",
            str(tmp_path / "a"),
            *FAST_TRAINING,
            *PUSH,
            "--max_steps",
            "3",
            "--save_steps",
            "1",
            "--hub_strategy",
            "every_save",
            "--hub_model_id",
            "tester/every-save",
        ]
    )
    assert len(commits("tester/every-save")) == 4  # the saves at steps 1, 2 and 3, then the end of training
    final_files = commits("tester/every-save")[-1][1]
    assert "optimizer.pt" not in final_files and "README.md" in final_files

    whole = tmp_path / "whole"
    run(
        [
            "--output_dir",
            str(whole),
            *FAST_TRAINING,
            *PUSH,
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--hub_strategy",
            "all_checkpoints",
            "--hub_model_id",
            "tester/all-checkpoints",
        ]
    )
    pushed = HfApi().list_repo_files("tester/all-checkpoints")
    assert {"checkpoint-2/optimizer.pt", "checkpoint-2/process_0.pt", "checkpoint-2/README.md"} <= set(pushed)
    resumed = tmp_path / "resumed"
    run(
        [
            "--output_dir",
            str(resumed),
            *FAST_TRAINING,
            "--log_with",
            "none",
            "--eval_steps",
            "0",
            "--max_steps",
            "4",
            "--resume_from_checkpoint",
            "hf://tester/all-checkpoints/checkpoint-2",
        ]
    )
    expected, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_failing_server_is_retried_until_it_recovers(tmp_path):
    seen = len(HUB.state.requests)
    HUB.state.fail_next(3)
    train_and_push(tmp_path, "tester/flaky")
    attempts = [r for r in HUB.state.requests[seen:] if r.startswith("POST /api/repos/create")]
    assert len(attempts) == 4  # three refused, the fourth went through
    assert "model.safetensors" in HfApi().list_repo_files("tester/flaky")


def test_a_server_that_stays_down_loses_nothing_locally(tmp_path, caplog):
    HUB.state.down = True
    try:
        final = run(
            [
                "--output_dir",
                str(tmp_path),
                *FAST_TRAINING,
                *PUSH,
                "--max_steps",
                "2",
                "--save_steps",
                "1",
                "--hub_strategy",
                "every_save",
                "--hub_model_id",
                "tester/down",
                "--hub_retries",
                "1",
            ]
        )
    finally:
        HUB.state.down = False
    assert "eval_loss" in final
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint-1" / "optimizer.pt").is_file()
    assert "tester/down" not in HUB.state.repos or not commits("tester/down")
    assert any("push(es) to tester/down failed" in record.getMessage() for record in caplog.records)


def test_remote_code_loads_where_hf_zoo_rnn_is_not_installed(tmp_path):
    """A fresh interpreter that cannot import hf_zoo_rnn (nor flashrnn) loads the pushed repo by its remote code."""
    train_and_push(tmp_path, "tester/remote-code")
    ids = [[5, 9, 2, 7, 1, 3]]
    expected = AutoModelForCausalLM.from_pretrained(tmp_path)(torch.tensor(ids)).logits
    script = f"""
import importlib.abc, json, sys, torch
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hf_zoo_rnn", "flashrnn"):
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Refuse())
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("tester/remote-code", trust_remote_code=True)
AutoTokenizer.from_pretrained("tester/remote-code")
assert "hf_zoo_rnn" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model).__module__
print("LOGITS", json.dumps(model(torch.tensor({ids})).logits.tolist()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOGITS " in result.stdout, result.stderr[-2000:]
    logits = torch.tensor(json.loads(result.stdout.split("LOGITS ", 1)[1].splitlines()[0]))
    assert torch.equal(logits, expected)


def test_push_script_uploads_an_existing_folder(tmp_path):
    run(
        [
            "--output_dir",
            str(tmp_path),
            *FAST_TRAINING,
            "--log_with",
            "none",
            "--eval_steps",
            "0",
            "--max_steps",
            "1",
            "--save_steps",
            "0",
        ]
    )
    run_script("push_to_hub.py", "--folder", str(tmp_path), "--repo_id", "tester/pushed-by-script")
    files = HfApi().list_repo_files("tester/pushed-by-script")
    assert "model.safetensors" in files and not any(f.startswith("checkpoint-") for f in files)
    with pytest.raises(subprocess.CalledProcessError):
        run_script("push_to_hub.py", "--folder", str(tmp_path / "nope"), "--repo_id", "tester/x")


def test_push_snapshots_stay_inside_the_output_directory(tmp_path, monkeypatch):
    made, real = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kwargs: made.append(Path(kwargs["dir"])) or real(**kwargs))
    out = tmp_path / "run"  # its parent may be read-only: a push must not write there
    train_and_push(out, "tester/snapshots", "--max_steps", "2", "--save_steps", "1", "--hub_strategy", "every_save")
    assert len(made) == 3 and set(made) == {out}  # two checkpoints and the final model
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and not list(out.glob(".hub-push-*"))
