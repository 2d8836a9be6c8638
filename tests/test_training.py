"""The trainer: the default run end to end, resume after SIGKILL, BPTT baseline, and every bad-input error."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import FAST_TRAINING, PROBES, ROOT, TINY_MODEL, run_script, train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_zoo_rnn.config_files import ConfigFileError, load_model_config
from hf_zoo_rnn.data import DataError
from hf_zoo_rnn.estimators import local as local_estimator
from hf_zoo_rnn.hub import is_local_reference
from hf_zoo_rnn.training import CheckpointError, TrainingStalledError, ZooTrainer, parse_arguments
from hf_zoo_rnn.training import checkpoints as checkpoints_module
from hf_zoo_rnn.training.checkpoints import checkpoints, latest_checkpoint, load_state, prune_checkpoints


def run(argv: list[str]) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    return ZooTrainer(*parse_arguments(argv)).train()


def fast_args(output_dir, *extra) -> list[str]:
    return ["--output_dir", str(output_dir), *FAST_TRAINING, *extra]


def test_default_run_leaves_a_loadable_model_card_logs_and_curve(tmp_path):
    out = tmp_path / "run"
    final = run(fast_args(out, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "3", "--logging_steps", "2"))
    assert "eval_loss" in final and final["eval_loss"] > 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "loss_curve.png",
        "metrics.jsonl",
        "modeling_zoo_rnn.py",
    ):
        assert (out / name).is_file(), name
    assert any(out.glob("hf_zoo_rnn/events.out.tfevents*")), "no TensorBoard events"
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # logged every 2 steps, at the evaluation of step 3 (an evaluation is never computed and dropped) and at the end
    assert [r["step"] for r in records if "train_loss" in r] == [2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 4]
    assert records[-2]["forward_passes"] == 4 * 2 * 4 and records[-2]["tokens"] == 4 * 64
    card = (out / "README.md").read_text()
    assert "zeroth-order" in card and "probes per step | 4" in card
    assert "trained on kjv: all but the books of Jude and Revelation" in card
    assert "Final evaluation on kjv: the books of Jude and Revelation: eval_loss" in card
    assert re.search(r"\| training time \| [\d.]+ s \([\d.]+ s in training steps\) \|", card)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("In the beginning", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_zo_loss_falls_on_the_bible(tmp_path):
    run(fast_args(tmp_path, "--max_steps", "60", "--eval_steps", "0", "--save_steps", "0", "--zo_lr", "0.05"))
    losses = train_losses(tmp_path)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_bptt_baseline_reduces_loss(tmp_path):
    final = run(
        fast_args(
            tmp_path,
            "--estimator",
            "bptt",
            "--bptt_lr",
            "0.01",
            "--max_steps",
            "20",
            "--eval_steps",
            "0",
            "--save_steps",
            "0",
            "--bptt_truncation",
            "8",
        )
    )
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5
    assert final["eval_loss"] < losses[0]


def test_task_training_reports_exact_match(tmp_path):
    final = run(
        [
            "--output_dir",
            str(tmp_path),
            "--task",
            "copy",
            *PROBES,
            "--model_config",
            str(TINY_MODEL),
            "--batch_size",
            "4",
            "--zo_num_probes",
            "2",
            "--max_steps",
            "2",
            "--eval_steps",
            "0",
            "--save_steps",
            "0",
            "--eval_batches",
            "1",
        ]
    )
    assert 0.0 <= final["exact_match_in_distribution"] <= 1.0 and 0.0 <= final["exact_match_out_of_distribution"] <= 1.0


def final_weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


HYBRID = [
    "--estimator",
    "hybrid",
    "--local_scope",
    "one_step",
    "--zo_parameters",
    "*.bias",
    "--zo_guide",
    "local+updates",
    "--local_steps",
    "2",
]


@pytest.mark.parametrize("mode", [[], HYBRID], ids=["zero_order", "hybrid"])
def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, mode):
    args = [
        *FAST_TRAINING,
        *mode,
        "--max_steps",
        "40",
        "--save_steps",
        "2",
        "--eval_steps",
        "0",
        "--log_with",
        "none",
        "--save_total_limit",
        "50",
    ]
    command = [sys.executable, str(ROOT / "scripts" / "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--output_dir", str(tmp_path / "whole"), *args], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--output_dir", str(killed), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint-4").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run(
        [*command, "--output_dir", str(killed), *args, "--resume_from_checkpoint", "latest"],
        check=True,
        env=env,
        capture_output=True,
    )
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(killed)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    logs = [(folder / "metrics.jsonl").read_text().splitlines() for folder in (tmp_path / "whole", killed)]
    logged = [[json.loads(line)["step"] for line in lines] for lines in logs]
    assert logged[0] == logged[1]  # the resumed run's log continues without repeating a step


def test_bad_inputs_give_one_clear_error_and_keep_what_was_written(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigFileError, match=r"train\.yaml: unknown key\(s\) \['learning_rat'\]"):
        parse_arguments(["--config", str(config)])
    bad_lines = [
        ("max_steps: ten", "max_steps must be a whole number, got 'ten'"),
        ("fixed_batch: 3", "fixed_batch must be true or false, got 3"),
        ("zo_lr: [0.1]", r"zo_lr must be a number or null, got \[0.1\]"),
    ]
    for line, message in bad_lines:
        config.write_text(line + "\n")
        with pytest.raises(ConfigFileError, match=rf"train\.yaml: {message}"):
            parse_arguments(["--config", str(config)])
    config.write_text("zo_lr: 1e-3\nmax_steps: '7'\n")  # YAML reads 1e-3 as text; the command line would convert it
    assert parse_arguments(["--config", str(config)])[3].lr == 0.001
    with pytest.raises(ValueError, match="estimator must be one of"):
        parse_arguments(["--estimator", "sgd"])
    with pytest.raises(ConfigFileError, match=r"the command line: .* prefix now \(num_probes -> zo_num_probes\)"):
        parse_arguments(["--num_probes", "3"])
    config.write_text("lr: 0.1\neps: 0.1\n")  # a config written before the zo_ prefix
    with pytest.raises(ConfigFileError, match=r"train\.yaml: .* \(eps -> zo_eps, lr -> zo_lr\)"):
        parse_arguments(["--config", str(config)])
    with pytest.raises(ValueError, match="task_eval_examples must be at least 1, got 0"):
        parse_arguments(["--task", "copy", "--task_eval_examples", "0"])
    for name in ("batch_size", "context_length"):
        with pytest.raises(ConfigFileError, match=f"{name} must be at least 1, got 0"):
            parse_arguments([f"--{name}", "0"])
    with pytest.raises(ConfigFileError, match="zo_lr must be positive .* got -1.0"):
        parse_arguments([*PROBES, "--zo_lr", "-1"])
    with pytest.raises(Exception, match="data file not found"):
        run(fast_args(tmp_path / "a", "--dataset", str(tmp_path / "missing.txt"), "--max_steps", "1"))

    out = tmp_path / "run"
    run(fast_args(out, "--max_steps", "2", "--save_steps", "1", "--eval_steps", "0"))
    with pytest.raises(CheckpointError, match="holds a different model than requested"):
        run(
            fast_args(out, "--max_steps", "3", "--resume_from_checkpoint", "latest")
            + ["--model_config", str(ROOT / "configs/model/tiny.yaml")]
        )
    checkpoint = out / "checkpoint-2"
    (checkpoint / "optimizer.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint-2/optimizer.safetensors does not match the checksum"):
        run(fast_args(out, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)))
    assert (checkpoint / "model.safetensors").is_file() and (out / "checkpoint-1").is_dir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run(fast_args(tmp_path / "empty", "--max_steps", "1", "--resume_from_checkpoint", "latest"))


def test_local_gradients_train_their_parameters_and_leave_the_rest_frozen(tmp_path):
    initial = ZooTrainer(*parse_arguments(fast_args(tmp_path / "init", "--max_steps", "1")))
    initial.setup()
    before = {name: param.detach().clone() for name, param in initial.model.named_parameters()}

    readout = tmp_path / "readout"
    run(fast_args(readout, "--max_steps", "4", "--estimator", "readout", "--local_lr", "0.01", "--local_steps", "3"))
    last = [r for r in map(json.loads, (readout / "metrics.jsonl").read_text().splitlines()) if "tokens" in r][-1]
    assert last["tokens"] == 4 * 3 * 2 * 32 and last["forward_passes"] == 4 * 3  # every local step's batch counts
    after = final_weights(readout)
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        assert moved == name.startswith("lm_head."), name  # the readout trained, the recurrence frozen at its init
    card = (readout / "README.md").read_text()
    assert "| lm_head.weight, lm_head.bias | readout gradient |" in card and "frozen (initial values)" in card

    one_step = tmp_path / "one_step"
    run(fast_args(one_step, "--max_steps", "30", "--estimator", "one_step", "--local_lr", "0.01"))
    losses = train_losses(one_step)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # a first-order method: it must fall fast
    after = final_weights(one_step)
    assert all(not torch.equal(after[name], value) for name, value in before.items())


def test_estimator_settings_that_cannot_work_are_clear_errors(tmp_path):
    with pytest.raises(ConfigFileError, match="--estimator probes needs zo_num_probes >= 1, got 0"):
        parse_arguments([*PROBES, "--zo_num_probes", "0"])
    with pytest.raises(ConfigFileError, match=r"zo_lr is required \(or zo_tied true"):
        parse_arguments(["--estimator", "probes"])
    with pytest.raises(ConfigFileError, match="guide='local' uses the one-step gradient.*local_scope=one_step"):
        parse_arguments([*PROBES, "--estimator", "hybrid", "--zo_guide", "local"])
    with pytest.raises(ConfigFileError, match="guide='local' uses the one-step gradient.*--estimator hybrid"):
        parse_arguments([*PROBES, "--zo_guide", "local"])
    with pytest.raises(ConfigFileError, match="max_train_seconds must be positive, got 0.0"):
        parse_arguments(["--max_train_seconds", "0"])
    with pytest.raises(ConfigFileError, match="local_scope must be one of"):
        parse_arguments([*PROBES, "--estimator", "hybrid", "--local_scope", "two_step"])
    with pytest.raises(ConfigFileError, match="local_scope=one_step trains every parameter and leaves none"):
        run(fast_args(tmp_path / "a", "--max_steps", "1", "--estimator", "hybrid", "--local_scope", "one_step"))
    with pytest.raises(ConfigFileError, match=r"zo_parameters '\*.gate': \['\*.gate'\] matches none"):
        run(fast_args(tmp_path / "b", "--max_steps", "1", "--zo_parameters", "*.gate"))
    out = tmp_path / "hybrid"
    run(fast_args(out, "--max_steps", "1", "--estimator", "hybrid", "--eval_steps", "0"))
    card = (out / "README.md").read_text()
    assert "zero-order probes and an exact local gradient (readout)" in card and "| local gradient | readout:" in card
    with pytest.raises(CheckpointError, match=r"another run .*\(estimator: checkpoint 'hybrid', this run 'probes'\)"):
        run(fast_args(out, "--max_steps", "2", "--resume_from_checkpoint", "latest"))


def test_an_estimator_state_names_its_kind_and_refuses_another():
    from hf_zoo_rnn.estimators.protocol import parts_of, tagged

    state = tagged("hybrid", local=tagged("readout", local={}), probes=tagged("probes", zo={"step": 2}))
    assert parts_of(parts_of(state, "hybrid")["probes"], "probes") == {"kind": "probes", "zo": {"step": 2}}
    with pytest.raises(ValueError, match="it was trained with --estimator hybrid; this run uses --estimator probes"):
        parts_of(state, "probes")
    flat = {"step": 2, "config": {}, "parameter_names": [], "buffers": {}}  # a ZO state before states had kinds
    assert parts_of(flat, "probes") == {"zo": flat}
    assert parts_of({**flat, "local": {}}, "hybrid") == {"local": {"local": {}}, "probes": flat}
    with pytest.raises(ValueError, match="another method, by an hf_zoo_rnn older than --estimator; .* one_step"):
        parts_of(flat, "one_step")


@pytest.mark.parametrize(
    ("retired", "meant"),
    [
        (["--optimizer", "bptt_sgd"], "--estimator bptt --bptt_optimizer sgd"),
        (["--objective", "reward"], "--estimator es"),
        (["--local_gradient", "none"], "--estimator probes"),
        (["--local_gradient", "readout", "--zo_num_probes", "8"], "--estimator hybrid --local_scope readout"),
        (["--local_gradient", "readout", "--zo_num_probes", "0"], "--estimator readout"),
    ],
)
def test_a_retired_method_option_names_the_estimator_it_meant(tmp_path, retired, meant):
    with pytest.raises(ConfigFileError, match=f"the command line: .*use {meant} "):
        parse_arguments(retired)
    config = tmp_path / "old.yaml"
    pairs = zip(retired[::2], retired[1::2], strict=True)
    config.write_text("".join(f"{name[2:]}: {value}\n" for name, value in pairs))
    with pytest.raises(ConfigFileError, match=f"old.yaml: .*use {meant} "):
        parse_arguments(["--config", str(config)])


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_training_config_parses(config):
    model_args, data_args, train_args, zo_config = parse_arguments(["--config", str(config)])
    assert train_args.output_dir.startswith("outputs/")
    if model_args.model_config:  # a built-in one by name: it loads from anywhere
        load_model_config(model_args.model_config)


def test_cli_overrides_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 7\nzo_num_probes: 8\n")
    _, _, train_args, zo_config = parse_arguments(["--config", str(config), "--max_steps", "3"])
    assert train_args.max_steps == 3 and zo_config.num_probes == 8


def test_fixed_batch_overfits_and_generate_evaluate_scripts_run(tmp_path):
    out = tmp_path / "copy"
    final = run(
        [
            "--output_dir",
            str(out),
            "--task",
            "copy",
            *PROBES,
            "--model_config",
            str(TINY_MODEL),
            "--fixed_batch",
            "--batch_size",
            "4",
            "--task_max_length",
            "4",
            "--zo_num_probes",
            "16",
            "--zo_lr",
            "0.05",
            "--max_steps",
            "60",
            "--eval_steps",
            "0",
            "--save_steps",
            "0",
            "--eval_batches",
            "1",
            "--log_with",
            "none",
        ]
    )
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 1.0  # one repeated batch is memorised quickly
    assert "exact_match_out_of_distribution" in final
    generated = run_script("generate.py", "--model", str(out), "--prompt", "abc ", "--max_new_tokens", "4")
    assert generated.stdout.startswith("abc ")
    evaluated = run_script(
        "evaluate.py", "--model", str(out), "--task", "copy", "--task_max_length", "4", "--examples", "4"
    )
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["exact_match_in_distribution"] <= 1


def test_curriculum_grows_the_task_length_and_is_checkpointed(tmp_path):
    run(
        [
            "--output_dir",
            str(tmp_path),
            "--task",
            "reverse",
            *PROBES,
            "--model_config",
            str(TINY_MODEL),
            "--batch_size",
            "2",
            "--zo_num_probes",
            "2",
            "--zo_lr",
            "0.01",
            "--max_steps",
            "3",
            "--save_steps",
            "0",
            "--eval_steps",
            "0",
            "--eval_batches",
            "1",
            "--task_max_length",
            "5",
            "--curriculum_threshold",
            "100",
            "--log_with",
            "none",
        ]
    )
    state = load_state(tmp_path / "checkpoint-3", "process_0")
    assert state["data"]["max_train_length"] == 8  # grew by one per step below the threshold


def test_empty_training_data_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="training data is empty"):
        run(["--output_dir", str(tmp_path / "out"), *FAST_TRAINING, "--dataset", str(empty), "--max_steps", "1"])
    with pytest.raises(ValueError, match="yields no full batch"):
        run(
            [
                "--output_dir",
                str(tmp_path / "out2"),
                *FAST_TRAINING,
                "--dataset",
                str(empty),
                "--tokenizer",
                "char",
                "--max_steps",
                "1",
            ]
        )


def test_big_models_are_saved_in_shards(tmp_path):
    run(fast_args(tmp_path, "--max_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--max_shard_size", "20KB"))
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.num_parameters() > 0


def test_stacked_probes_train_like_sequential_ones_and_early_stop_ends_the_run(tmp_path):
    losses = {}
    no_evals_or_saves = ["--eval_steps", "0", "--save_steps", "0"]
    for per_forward in ("1", "2"):
        out = tmp_path / f"probes-{per_forward}"
        probes = ["--zo_lr", "0.05", "--zo_probes_per_forward", per_forward]
        run(fast_args(out, "--max_steps", "3", *no_evals_or_saves, *probes, "--log_with", "none"))
        losses[per_forward] = train_losses(out)
    assert losses["2"] == pytest.approx(losses["1"], abs=1e-5)
    out = tmp_path / "early"
    early_stop = ["--log_with", "none", "--stop_at_train_loss", "100"]
    final = run(fast_args(out, "--max_steps", "50", *no_evals_or_saves, *early_stop))
    assert len(train_losses(out)) == 1 and (out / "checkpoint-1").is_dir() and "eval_loss" in final


def damage(path: Path) -> None:
    """Flip 16 bytes in the middle of a file, as a disk fault or a partial copy would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_latest_falls_back_to_the_newest_good_one(tmp_path):
    args = [
        "--max_steps",
        "3",
        "--save_steps",
        "1",
        "--eval_steps",
        "0",
        "--save_total_limit",
        "5",
        "--log_with",
        "none",
    ]
    whole = tmp_path / "whole"
    run(fast_args(whole, *args))
    for name in ("model.safetensors", "optimizer.safetensors", "process_0.json", "trainer_state.json"):
        out = tmp_path / name
        shutil.copytree(whole, out)
        damage(out / "checkpoint-3" / name)
        with pytest.raises(CheckpointError, match=rf"checkpoint-3/{re.escape(name)} does not match the checksum"):
            run(fast_args(out, *args, "--resume_from_checkpoint", str(out / "checkpoint-3")))
        run(fast_args(out, *args, "--resume_from_checkpoint", "latest"))  # resumes from checkpoint-2
        resumed, expected = final_weights(out), final_weights(whole)
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), name
    every = tmp_path / "all_damaged"
    shutil.copytree(whole, every)
    for folder in sorted(every.glob("checkpoint-*")):
        damage(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no checkpoint that verifies"):
        run(fast_args(every, *args, "--resume_from_checkpoint", "latest"))


def test_pruning_never_removes_the_newest_checkpoint_that_verifies(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(fast_args(out, "--max_steps", "3", "--save_steps", "1", "--eval_steps", "0", "--save_total_limit", "5"))
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    damage(out / "checkpoint-3" / "model.safetensors")
    prune_checkpoints(out, keep=1)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # the newest, and the newest good
    assert latest_checkpoint(out) == out / "checkpoint-2"

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(checkpoints_module, "file_sha256", no_hashing)  # a save's own checkpoint is not re-read
    prune_checkpoints(fresh, keep=1, known_good=fresh / "checkpoint-3")
    assert [p.name for p in checkpoints(fresh)] == ["checkpoint-3"]


def test_a_run_whose_steps_are_all_skipped_stops_before_saving(tmp_path):
    out = tmp_path / "diverged"  # probes at theta +- 1e38 z: every loss is NaN, every step skipped
    diverging = ["--zo_eps", "1e38", "--max_skipped_steps", "3"]
    with pytest.raises(TrainingStalledError, match=r"step \d+: 3 steps in a row were skipped \(every probe's loss"):
        run(fast_args(out, "--max_steps", "30", "--save_steps", "0", "--eval_steps", "0", *diverging))
    assert not (out / "model.safetensors").exists()


def test_resuming_on_other_data_or_another_tokenizer_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    run(fast_args(out, "--max_steps", "1", "--eval_steps", "0", "--log_with", "none"))
    resume = ["--max_steps", "2", "--resume_from_checkpoint", "latest", "--log_with", "none"]
    with pytest.raises(CheckpointError, match=r"tokenizer: checkpoint 'bpe', this run 'char'.*--init_from"):
        run(fast_args(out, *resume, "--tokenizer", "char"))
    with pytest.raises(CheckpointError, match=r"dataset: checkpoint 'kjv', this run '.*Apache-2.0'"):
        run(fast_args(out, *resume, "--dataset", "/usr/share/common-licenses/Apache-2.0"))
    run(fast_args(out, *resume))  # the same data resumes


def test_a_non_finite_local_gradient_is_skipped_and_stops_the_run_when_it_persists(tmp_path, monkeypatch):
    def poisoned(model, input_ids, labels, scope):  # what a diverged model or a bad batch would give
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.full_like(param, float("nan"))
        return float("nan")

    monkeypatch.setattr(local_estimator, "accumulate_local_gradients", poisoned)
    out = tmp_path / "nan"
    one_step = ["--estimator", "one_step", "--local_steps", "2", "--max_skipped_steps", "2"]
    with pytest.raises(
        TrainingStalledError, match=r"step 2: 2 steps in a row were skipped \(the loss was NaN or infinite\)"
    ):
        run(fast_args(out, *one_step, "--max_steps", "5", "--save_steps", "0", "--eval_steps", "0"))
    assert not (out / "model.safetensors").exists()


def test_generate_and_evaluate_name_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for script, model, message in (
        ("generate.py", missing, f"generate.py: {missing}: no such folder"),
        ("evaluate.py", empty, f"evaluate.py: {empty} holds no trained model (no config.json)"),
    ):
        with pytest.raises(subprocess.CalledProcessError) as caught:
            run_script(script, "--model", str(model))
        assert message in caught.value.stderr and "Traceback" not in caught.value.stderr
    out = tmp_path / "run"
    run(fast_args(out, "--max_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--log_with", "none"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("In the beginning.")
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run_script("evaluate.py", "--model", str(out), "--dataset", str(tiny), "--split", "train")
    assert "yields no full batch of 8 x 128 tokens" in caught.value.stderr
    (out / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run_script("generate.py", "--model", str(out))
    assert f"cannot load the model in {out}" in caught.value.stderr and "Traceback" not in caught.value.stderr
    monkeypatch.chdir(tmp_path)  # a typo under an existing folder is a missing folder, not a Hub repo id
    (tmp_path / "outputs").mkdir()
    assert is_local_reference("outputs/defualt") and not is_local_reference("someone/model")


def test_local_data_validates_on_held_out_documents_or_the_named_validation_data(tmp_path, caplog):
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": f"story {i}: " + "once upon a time " * 4}) + "\n" for i in range(400)))
    base = [
        "--dataset",
        str(data),
        "--tokenizer",
        "char",
        "--max_steps",
        "1",
        "--save_steps",
        "0",
        "--log_with",
        "none",
    ]
    with caplog.at_level("WARNING"):
        final = run(fast_args(tmp_path / "held_out", *base))
    held_out = f"{data}: the 5% of its documents held out by a hash of their text"
    assert f"validating on {held_out}" in caplog.text and "eval_loss" in final
    assert f"Final evaluation on {held_out}: eval_loss" in (tmp_path / "held_out" / "README.md").read_text()
    model = str(tmp_path / "held_out")  # a character model: text outside its alphabet is named, never padding
    with pytest.raises(subprocess.CalledProcessError) as caught:
        run_script("generate.py", "--model", model, "--prompt", "café 中")
    assert f"generate.py: the prompt has text outside {model}'s vocabulary: 'é', '中'" in caught.value.stderr
    assert len(run_script("generate.py", "--model", model, "--prompt", "", "--max_new_tokens", "5").stdout) > 0
    other = tmp_path / "other.txt"
    other.write_text("a different text entirely. " * 200)
    run(fast_args(tmp_path / "named", *base, "--validation_dataset", str(other), "--zo_perturbation", "lowrank"))
    card = (tmp_path / "named" / "README.md").read_text()
    assert (
        f"trained on {data}: all of it" in card
        and f"Final evaluation on {other}: all of it (--validation_dataset)" in card
    )
    assert "probes per step | 4 (rademacher, central difference, low-rank matrices r = 1)" in card
    caplog.clear()
    with caplog.at_level("WARNING"):
        final = run(fast_args(tmp_path / "tiny", *base, "--validation_fraction", "0.001", "--context_length", "128"))
    assert "eval_loss" not in final and "no validation loss" in caplog.text and "--validation_dataset" in caplog.text
    assert "Final evaluation on" in (tmp_path / "tiny" / "README.md").read_text()


def test_train_module_ends_a_user_mistake_with_one_line(tmp_path):
    error_file = tmp_path / "error.json"  # what torch elastic (accelerate launch) gives each process
    args = fast_args(tmp_path / "out", "--dataset", str(tmp_path / "no.txt"))
    command = [sys.executable, "-m", "hf_zoo_rnn.train", *args]
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    message = f"train.py: error: data file not found: {tmp_path / 'no.txt'}"
    assert result.returncode == 1 and result.stderr.strip().endswith(message) and "Traceback" not in result.stderr
    assert json.loads(error_file.read_text())["message"] == message


def to_legacy_pickles(checkpoint: Path, states: dict) -> None:
    """Replace the checkpoint's states by NAME.pt pickles of `states` (what versions before safetensors wrote),
    then re-sign its manifest as an attacker would."""
    for name, state in states.items():
        for suffix in (".json", ".safetensors"):
            (checkpoint / f"{name}{suffix}").unlink(missing_ok=True)
        torch.save(state, checkpoint / f"{name}.pt")
    checkpoints_module.write_manifest(checkpoint)


class Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, trace: Path):
        self.trace = trace

    def __reduce__(self):
        return (os.system, (f"touch {self.trace}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_older_pickles_still_resume(tmp_path):
    args = ["--save_steps", "2", "--eval_steps", "0", "--log_with", "none"]
    run(fast_args(tmp_path / "whole", "--max_steps", "4", *args))
    out, trace = tmp_path / "run", tmp_path / "payload-ran"
    run(fast_args(out, "--max_steps", "2", *args))
    checkpoint = out / "checkpoint-2"
    honest = {name: load_state(checkpoint, name) for name in ("process_0", "optimizer")}
    to_legacy_pickles(checkpoint, {"process_0": {"data": Payload(trace), "rng": torch.get_rng_state()}})
    resume = fast_args(out, "--max_steps", "4", *args, "--resume_from_checkpoint", "latest")
    with pytest.raises(CheckpointError, match=r"process_0.pt holds objects other than tensors .* could run code"):
        run(resume)
    assert not trace.exists(), "unpickling the checkpoint ran the attacker's command"
    to_legacy_pickles(checkpoint, honest)  # what the previous version wrote: plain pickles, read safely
    run(resume)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_bad_data_and_options_each_give_one_line_naming_the_cause(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": "fine"}\n{"text": 12345}\n')
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": null}\n')
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "count": [1, 2]}), table)
    one_char_step = ["--tokenizer", "char", "--max_steps", "1"]
    for dataset, extra, message in (
        (numbers, [], rf"{numbers}, line 2: column 'text' holds int 12345, not text"),
        (nulls, [], rf"{nulls}, line 1: column 'text' holds NoneType None, not text"),
        (table, ["--text_column", "count"], rf"{table}, row 1: column 'count' holds int 1, not text"),
    ):
        args = fast_args(tmp_path / "out", "--dataset", str(dataset), *one_char_step, "--overwrite_output_dir", *extra)
        with pytest.raises(DataError, match=message):
            run(args)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("text")
    (mixed / "b.jsonl").write_text('{"text": "text"}\n')
    with pytest.raises(DataError, match=r"mixes formats \(.jsonl, .txt\): one run reads one format"):
        run(fast_args(tmp_path / "out", "--dataset", str(mixed / "*"), "--max_steps", "1", "--overwrite_output_dir"))
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n \n")
    blank_args = fast_args(tmp_path / "blank", "--dataset", str(blank), *one_char_step)
    result = subprocess.run([sys.executable, "-m", "hf_zoo_rnn.train", *blank_args], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "yields no full batch" in result.stderr.strip().splitlines()[-1]
    # --model_config beside --init_from is checked against the loaded model, not ignored
    source = tmp_path / "source"
    run(fast_args(source, "--max_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--log_with", "none"))
    with pytest.raises(CheckpointError, match=r"holds a different model than requested \(embedding_size: requested"):
        run(fast_args(tmp_path / "init", "--init_from", str(source), "--model_config", "tiny", "--max_steps", "1"))
    for value in ("0", "-3"):
        with pytest.raises(subprocess.CalledProcessError) as caught:
            run_script("generate.py", "--model", str(source), "--max_new_tokens", value)
        assert f"--max_new_tokens must be at least 1, got {value}" in caught.value.stderr
        assert "Traceback" not in caught.value.stderr


def test_every_registered_estimator_parses_describes_itself_and_owns_its_options():
    from dataclasses import fields

    from hf_zoo_rnn.estimators import ARGUMENT_GROUPS, ESTIMATORS
    from hf_zoo_rnn.training.arguments import TrainArguments

    zero_order = PROBES[2:]  # the zo_ options without the estimator
    needs = {"probes": zero_order, "hybrid": zero_order}
    needs["es"] = [*zero_order, "--init_from", "x", "--prompts", "add", "--rewards", "add_exact"]
    names = {field.name for field in fields(TrainArguments)}
    for name, spec in ESTIMATORS.items():
        args = parse_arguments(["--estimator", name, *needs.get(name, [])])
        assert args.train.objective == spec.objective
        sentence, rows = spec.describe(args), spec.card_rows(args)
        assert sentence.startswith("**") and all(len(row) == 2 for row in rows), name
        for group in spec.arguments:  # its options parse as the run's
            assert group in ARGUMENT_GROUPS and {field.name for field in fields(group)} <= names


@pytest.mark.parametrize("method", [[], HYBRID], ids=["probes", "hybrid"])
def test_a_checkpoint_from_before_the_estimator_option_resumes_bitwise(tmp_path, method):
    """What the previous version wrote: a flat estimator state (the local gradient's under "local", the ZO
    optimiser's keys beside it) and a run identity naming the retired optimizer option."""
    from hf_zoo_rnn.training.checkpoints import save_state

    # schedules that do not depend on max_steps, so a 2-step run is the first half of a 4-step one
    args = [*method, "--local_lr_schedule", "constant", "--save_steps", "2", "--eval_steps", "0", "--log_with", "none"]
    run(fast_args(tmp_path / "whole", "--max_steps", "4", *args))
    out = tmp_path / "run"
    run(fast_args(out, "--max_steps", "2", *args))
    checkpoint = out / "checkpoint-2"
    state = load_state(checkpoint, "optimizer")  # probes: {kind, zo}; hybrid: {kind, local: {kind, local}, probes}
    if state["kind"] == "hybrid":
        flat = {**state["probes"]["zo"], "local": state["local"]["local"]}
    else:
        flat = state["zo"]
    save_state(flat, checkpoint, "optimizer")
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    trainer_state["run"] = {"seed": 0, "optimizer": "zo"}
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    checkpoints_module.write_manifest(checkpoint)
    run(fast_args(out, "--max_steps", "4", *args, "--resume_from_checkpoint", "latest"))
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with pytest.raises(CheckpointError, match="trained with another method, by an hf_zoo_rnn older than --estimator"):
        run(fast_args(tmp_path / "other", "--estimator", "bptt", "--resume_from_checkpoint", str(checkpoint)))


def test_an_option_the_estimator_does_not_read_is_named_in_one_warning(caplog):
    parse_arguments(["--estimator", "one_step", "--zo_eps", "0.1", "--bptt_lr", "0.1", "--local_lr", "0.01"])
    warnings = [record.getMessage() for record in caplog.records if "does not read" in record.getMessage()]
    assert warnings == [
        "--estimator one_step does not read zo_eps (read by probes, hybrid, es); bptt_lr (read by bptt): ignored"
    ]
    caplog.clear()
    parse_arguments([*PROBES, "--zo_eps", "0.1", "--zo_parameters", "*.bias"])
    assert not [record for record in caplog.records if "does not read" in record.getMessage()]
