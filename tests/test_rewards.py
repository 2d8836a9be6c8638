"""Training on rewards: reward functions with TRL's signature, their errors, and evolution strategies in the trainer
(resume and two processes bitwise, members seeded wherever they run)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, train_add_model
from safetensors.torch import load_file

from hf_zoo_rnn.data.prompts import PromptStream
from hf_zoo_rnn.rewards import (
    RewardError,
    add_exact,
    combined_rewards,
    distinct_3,
    distinct_4,
    load_reward_function,
    member_seed,
    pass_at_k,
    reverse_exact,
)
from hf_zoo_rnn.training import ZooTrainer, parse_arguments


def test_built_in_rewards_check_the_answer_they_compute():
    assert add_exact(["12+30 ", "5+5 ", "not a sum "], ["42 ", "11 ", "0"]) == [1.0, 0.0, 0.0]
    assert reverse_exact(["abc "], ["cba  and more"]) == [1.0]
    assert distinct_4([""], ["the LORD and the LORD and the LORD and the"]) == [pytest.approx(3 / 7)]
    assert distinct_4([""], ["a b c d e f"]) == [1.0] and distinct_4([""], ["too short"]) == [0.0]
    loop = " ".join(["the LORD said unto him,"] * 30)  # a loop longer than a 40-token window still repeats
    assert distinct_3([""], [loop]) == [pytest.approx(5 / 148)] and distinct_3([""], ["a b c d"]) == [1.0]
    assert pass_at_k([0.0, 1.0, 0.0, 0.0, math.nan, 0.5], 2) == [1.0, 0.0, 0.5]


def nan_reward(prompts, completions, **_):
    return [math.nan if "x" in c else 1.0 for c in completions]


def test_bad_reward_functions_are_one_error_naming_the_function_and_row():
    def raises(prompts, completions, **_):
        raise KeyError("answer")

    def short(prompts, completions, **_):
        return [1.0]

    def words(prompts, completions, **_):
        return [1.0, "high"]

    prompts, completions = ["p1", "p2"], ["a", "b"]
    bad_functions = [
        (raises, "reward function raises raised KeyError"),
        (short, "reward function short returned 1 values for 2 completions"),
        (words, r"reward function words, row 1 \('p2'\): 'high' is not a number"),
    ]
    for function, message in bad_functions:
        with pytest.raises(RewardError, match=message):
            combined_rewards([function], [1.0], prompts, completions, {})
    rewards, nonfinite, _ = combined_rewards([nan_reward, distinct_4], [1.0, 0.5], ["p", "q"], ["x", "y z"], {})
    assert math.isnan(rewards[0]) and rewards[1] == 1.0 and nonfinite == 1
    assert load_reward_function("test_rewards:nan_reward") is nan_reward
    bad_specs = [
        ("nope", "neither built in"),
        ("no_such_module:f", "cannot be loaded"),
        ("test_rewards:missing", "cannot be loaded"),
    ]
    for spec, message in bad_specs:
        with pytest.raises(RewardError, match=message):
            load_reward_function(spec)


def test_member_seeds_are_distinct_and_fixed():
    seeds = {member_seed(0, step, probe, column) for step in range(20) for probe in range(50) for column in (0, 1)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert member_seed(3, 1, 2, 0) == member_seed(3, 1, 2, 0) != member_seed(4, 1, 2, 0)


def test_prompt_streams_resume_by_counting_and_carry_columns(tmp_path):
    stream = PromptStream("add", "train", 4, seed=1)
    first = [batch for batch, _ in zip(stream, range(3), strict=False)]
    assert all(p.endswith(" ") and "+" in p for p in first[0].prompts) and len(first[0].columns["answer"]) == 4
    resumed = PromptStream("add", "train", 4, seed=1)
    resumed.load_state_dict({"batches_served": 2})
    assert next(iter(resumed)).prompts == first[2].prompts
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(7)))
    batch = PromptStream(str(rows), "train", 3, seed=0).batch(0)
    assert all(f"q{a}" == p for p, a in zip(batch.prompts, batch.columns["answer"], strict=True))


@pytest.fixture(scope="module")
def add_model(tmp_path_factory):
    return train_add_model(tmp_path_factory.mktemp("add") / "ce", max_steps=60)


def reward_args(out, start, *extra) -> list[str]:
    args = ["--output_dir", str(out), "--estimator", "es", "--init_from", str(start), "--prompts", "add"]
    args += ["--rewards", "add_exact,test_rewards:nan_reward", "--zo_num_probes", "4", "--zo_update_rule", "adam"]
    args += ["--zo_lr_schedule", "cosine", "--zo_warmup_steps", "20"]
    args += ["--zo_eps", "0.05", "--zo_lr", "0.01", "--zo_loss_shaping", "centered_ranks", "--batch_size", "3"]
    args += ["--max_new_tokens", "4", "--do_sample", "--reward_samples", "2", "--reward_aggregation", "best"]
    args += ["--anchor_decay", "0.1", "--log_with", "none", "--eval_steps", "0", "--eval_batches", "1"]
    return [*args, "--logging_steps", "1", *extra]


def run(argv):
    AcceleratorState._reset_state(reset_partial_state=True)
    return ZooTrainer(*parse_arguments(argv)).train()


def test_evolution_strategies_resume_bitwise_and_record_the_objective(add_model, tmp_path):
    run(reward_args(tmp_path / "whole", add_model, "--max_steps", "4", "--save_steps", "2"))
    run(reward_args(tmp_path / "part", add_model, "--max_steps", "2", "--save_steps", "2"))
    resume_to_step_4 = ["--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest"]
    run(reward_args(tmp_path / "part", add_model, *resume_to_step_4))
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "part"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    start = load_file(add_model / "model.safetensors")
    assert not all(torch.equal(whole[k], start[k]) for k in whole)  # it trained
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(
        "reward" in r and "rewards/add_exact/mean" in r and r["generated_tokens"] == 8 * 3 * 2 * 4
        for r in records
        if "train_loss" in r
    )
    assert "eval_reward" in records[-1] and "eval_reward_in_distribution" in records[-1]
    card = (tmp_path / "whole" / "README.md").read_text()
    assert "**rewards of generated text**: add_exact,test_rewards:nan_reward" in card and str(add_model) in card


def test_two_processes_train_on_rewards_bitwise_like_one(add_model, tmp_path):
    args = reward_args(tmp_path / "two", add_model, "--max_steps", "2", "--save_steps", "0")
    two_processes = ROOT / "configs/accelerate/cpu-2.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(two_processes)]
    launch += ["-m", "hf_zoo_rnn.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.set_num_threads(1)
    try:
        run([*args[:1], str(tmp_path / "one"), *args[2:]])
    finally:
        torch.set_num_threads(2)
    two, one = (load_file(tmp_path / name / "model.safetensors") for name in ("two", "one"))
    assert all(torch.equal(two[k], one[k]) for k in one)
    assert "2 process(es)" in (tmp_path / "two" / "README.md").read_text()


def test_reward_settings_that_cannot_work_are_clear_errors(add_model, tmp_path):
    from hf_zoo_rnn.config_files import ConfigFileError

    bad_settings = [
        (["--zo_num_probes", "0"], "--estimator es needs zo_num_probes >= 1"),
        (["--reward_samples", "3", "--do_sample", "false"], "add --do_sample"),
        (["--rewards", "add_exact,no_such_module:f"], "cannot be loaded"),
    ]
    for extra, message in bad_settings:
        with pytest.raises(ConfigFileError, match=message):
            run(reward_args(tmp_path / "bad", add_model, "--max_steps", "1", "--overwrite_output_dir", *extra))
    with pytest.raises(ConfigFileError, match="give it with --init_from"):
        parse_arguments(["--estimator", "es", "--zo_lr", "0.01", "--prompts", "add", "--rewards", "add_exact"])


def test_rewards_take_what_trl_takes_numpy_none_and_trl_keywords():
    import numpy as np

    seen = {}

    def numpy_array(prompts, completions, completion_ids, trainer_state, **columns):
        seen.update(ids=completion_ids, state=trainer_state, columns=columns)
        return np.array([0.5, 1.5])

    def numpy_scalars_and_none(prompts, completions, **_):
        return [np.float32(2.0), None]

    def only_none(prompts, completions, **_):
        return [None] * len(completions)

    functions = [numpy_array, numpy_scalars_and_none, only_none]
    columns = {"completion_ids": [[1], [2, 3]], "trainer_state": "state", "answer": ["1", "2"]}
    totals, nonfinite, per_function = combined_rewards(functions, [1.0, 0.5, 3.0], ["p", "q"], ["a", "b"], columns)
    assert totals == [1.5, 1.5] and nonfinite == 0  # None is left out of the sum, as TRL's nansum does
    assert math.isnan(per_function["numpy_scalars_and_none"][1]) and all(map(math.isnan, per_function["only_none"]))
    assert seen == {"ids": [[1], [2, 3]], "state": "state", "columns": {"answer": ["1", "2"]}}
    nothing, counted, _ = combined_rewards([only_none], [1.0], ["p"], ["a"], {})
    assert math.isnan(nothing[0]) and counted == 1  # no function applies: dropped and counted
    with pytest.raises(RewardError, match=r"reward function bad, row 0 \('p'\): \[1\] is not a number"):

        def bad(prompts, completions, **_):
            return [[1]]

        combined_rewards([bad], [1.0], ["p"], ["a"], {})


def slow_when_flagged(prompts, completions, **_):
    """Sleeps while the file named by $SLOW_REWARD_FLAG exists (after writing '<flag>.started'): a hung reward."""
    flag = os.environ.get("SLOW_REWARD_FLAG", "")
    if flag and os.path.exists(flag):
        open(flag + ".started", "w").close()
        time.sleep(120)
    return [0.0] * len(completions)


def test_a_hung_reward_meets_its_deadline_and_bad_specs_are_one_line(add_model, tmp_path, monkeypatch):
    from hf_zoo_rnn.config_files import ConfigFileError

    flag = tmp_path / "slow"
    flag.touch()
    monkeypatch.setenv("SLOW_REWARD_FLAG", str(flag))
    started = time.perf_counter()
    with pytest.raises(RewardError, match=r"slow_when_flagged did not return within 1 s \(--reward_timeout; one call"):
        combined_rewards([slow_when_flagged], [1.0], ["p"], ["a"], {}, timeout=1.0)
    assert time.perf_counter() - started < 10
    broken = tmp_path / "broken_reward_module.py"
    broken.write_text("def reward(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="broken_reward_module:reward.* cannot be loaded: SyntaxError"):
        load_reward_function("broken_reward_module:reward")
    with pytest.raises(ConfigFileError, match="reward_weights must be numbers separated by commas, got '1,high'"):
        run(reward_args(tmp_path / "w", add_model, "--reward_weights", "1,high"))


def test_sigterm_during_a_slow_reward_saves_at_once_and_the_resume_is_bitwise(add_model, tmp_path):
    """The step in flight is abandoned (its prompts read again on resume): the run that was stopped ends equal to
    one that never was."""
    flag = tmp_path / "slow"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "SLOW_REWARD_FLAG": str(flag)}
    rewards = ["--rewards", "add_exact,test_rewards:slow_when_flagged", "--max_steps", "3", "--save_steps", "0"]
    command = [sys.executable, "-m", "hf_zoo_rnn.train", *reward_args(tmp_path / "stopped", add_model), *rewards]
    uninterrupted = [*command[:3], *reward_args(tmp_path / "whole", add_model), *rewards]
    subprocess.run(uninterrupted, env=env, check=True, capture_output=True, timeout=600)
    flag.touch()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(f"{flag}.started") and time.time() < deadline:
        time.sleep(0.2)
    flag.unlink()
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert time.perf_counter() - signalled < 15 and process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "during step 1's rewards" in stderr and "Traceback" not in stderr
    resume = [*command, "--resume_from_checkpoint", "latest"]
    subprocess.run(resume, env=env, check=True, capture_output=True, timeout=600)
    whole, stopped = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "stopped"))
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)


def test_a_reward_deadline_leaves_the_hosts_timer_and_handler_as_they_were():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        combined_rewards([distinct_4], [1.0], ["p"], ["a b c d e"], {}, timeout=5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 30 and not fired  # the outer timer runs on, its handler back in place
        assert signal.getsignal(signal.SIGALRM) is not None and signal.getsignal(signal.SIGALRM)(0, None) is None
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
