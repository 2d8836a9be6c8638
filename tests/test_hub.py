"""The Hub, against the loopback server of conftest.py driven by the real huggingface_hub / transformers clients."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING, HUB, run_script
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from test_generation import NEW_TOKENS, fp64_model, greedy_carrying_state, greedy_dropping_state
from test_training import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_zoo_rnn.config_files import ConfigFileError
from hf_zoo_rnn.hub import PushFailedError

PUSH = ["--push_to_hub", "--hub_retries", "3", "--hub_retry_seconds", "0.05", "--log_with", "none", "--eval_steps", "0"]


def train_and_push(output_dir, repo_id: str, *extra: str) -> dict:
    """A one-step training run that pushes its final model to `repo_id` at the end."""
    args = ["--output_dir", str(output_dir), *FAST_TRAINING, *PUSH, "--max_steps", "1", "--save_steps", "0"]
    return run([*args, "--hub_strategy", "end", "--hub_model_id", repo_id, *extra])


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
    assert "optimizer.safetensors" not in final_files and "README.md" in final_files

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
    assert {"checkpoint-2/optimizer.safetensors", "checkpoint-2/process_0.json", "checkpoint-2/README.md"} <= set(
        pushed
    )
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


def test_a_server_that_stays_down_loses_nothing_locally_and_fails_the_run(tmp_path, caplog):
    HUB.state.down = True
    try:
        with pytest.raises(
            PushFailedError, match=r"holds the model, but pushing it to tester/down failed .*hf-zoo-rnn-push"
        ):
            args = ["--output_dir", str(tmp_path), *FAST_TRAINING, *PUSH, "--max_steps", "2", "--save_steps", "1"]
            run([*args, "--hub_strategy", "every_save", "--hub_model_id", "tester/down", "--hub_retries", "1"])
    finally:
        HUB.state.down = False
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
    assert (tmp_path / "checkpoint-1" / "optimizer.safetensors").is_file()
    assert "tester/down" not in HUB.state.repos or not commits("tester/down")
    assert any("push(es) to tester/down failed" in record.getMessage() for record in caplog.records)


def test_a_hub_that_never_answers_cannot_hold_the_run_nor_fill_the_disk(tmp_path):
    """The endpoint accepts connections and never replies: the run ends after hub_timeout with its output saved,
    and pushes that waited behind the stalled one were superseded (their snapshots removed), not piled up."""
    HUB.state.stalled.set()
    started = time.monotonic()
    try:
        with pytest.raises(PushFailedError, match=r"unfinished after 3 s"):
            args = ["--output_dir", str(tmp_path), *FAST_TRAINING, *PUSH, "--max_steps", "6", "--save_steps", "1"]
            run([*args, "--hub_strategy", "every_save", "--hub_model_id", "tester/stalled", "--hub_timeout", "3"])
        snapshots = list(tmp_path.glob(".hub-push-*"))
    finally:
        HUB.state.stalled.clear()
    assert time.monotonic() - started < 60
    assert len(snapshots) <= 2, snapshots  # the one in flight and the final one; 5 others were superseded
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint-6").is_dir()


def test_push_without_a_repo_id_while_the_hub_is_down_is_one_clear_error(tmp_path):
    HUB.state.down = True
    try:
        with pytest.raises(ConfigFileError, match=r"needs the Hub to say who you are.*--hub_model_id owner/name"):
            run(
                [
                    "--output_dir",
                    str(tmp_path),
                    *FAST_TRAINING,
                    "--push_to_hub",
                    "--hub_retries",
                    "0",
                    "--max_steps",
                    "1",
                ]
            )
    finally:
        HUB.state.down = False


# The start of a script for an interpreter where hf_zoo_rnn and flashrnn are not installed (a Hub user's).
WITHOUT_HF_ZOO_RNN = """
import importlib.abc, json, sys, torch
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hf_zoo_rnn", "flashrnn"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Refuse())
"""


def printed(script: str, tag: str):
    """Run `script` in a fresh interpreter in an empty folder; the JSON it printed after `tag`."""
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tag} " in result.stdout, result.stderr[-2000:]
    return json.loads(result.stdout.split(f"{tag} ", 1)[1].splitlines()[0])


def test_remote_code_loads_where_hf_zoo_rnn_is_not_installed(tmp_path):
    """A fresh interpreter that cannot import hf_zoo_rnn (nor flashrnn) loads the pushed repo by its remote code."""
    train_and_push(tmp_path, "tester/remote-code")
    ids = [[5, 9, 2, 7, 1, 3]]
    expected = AutoModelForCausalLM.from_pretrained(tmp_path)(torch.tensor(ids)).logits
    script = (
        WITHOUT_HF_ZOO_RNN
        + f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("tester/remote-code", trust_remote_code=True)
AutoTokenizer.from_pretrained("tester/remote-code")
assert "hf_zoo_rnn" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model).__module__
print("LOGITS", json.dumps(model(torch.tensor({ids})).logits.tolist()))
"""
    )
    logits = torch.tensor(printed(script, "LOGITS"))
    assert torch.equal(logits, expected)


@pytest.mark.transformers
def test_remote_code_generates_like_the_hand_loop_where_hf_zoo_rnn_is_not_installed():
    """Push a model, load it by its remote code in an interpreter that cannot import hf_zoo_rnn, and generate: the
    tokens are those of the hand loop that carries the state (the truth), under whichever transformers runs."""
    model = fp64_model("gru", layers=2)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        HfApi().create_repo("tester/remote-generate")
        HfApi().upload_folder(repo_id="tester/remote-generate", folder_path=folder)
    prompt = [[5, 9, 2, 7, 1, 3], [8, 8, 1, 0, 4, 2]]
    truth = greedy_carrying_state(model, torch.tensor(prompt), NEW_TOKENS)
    assert not torch.equal(truth, greedy_dropping_state(model, torch.tensor(prompt), NEW_TOKENS))
    script = (
        WITHOUT_HF_ZOO_RNN
        + f"""
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("tester/remote-generate", trust_remote_code=True)
assert "hf_zoo_rnn" not in sys.modules and type(model).__module__.startswith("transformers_modules")
out = {{c: model.generate(torch.tensor({prompt}), max_new_tokens={NEW_TOKENS}, use_cache=c).tolist() for c in (True, False)}}
print("GENERATED", json.dumps(out))
"""
    )
    generated = printed(script, "GENERATED")
    assert generated["true"] == truth.tolist() and generated["false"] == truth.tolist()


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
