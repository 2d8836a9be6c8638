"""Benchmarks are scripts, not timed tests: here they only have to run on tiny settings and write their files."""

import csv

from conftest import FAST_TRAINING, run_script

# a start for the generation benchmarks: two quiet steps of the fast training run
TWO_QUIET_STEPS = [*FAST_TRAINING, "--max_steps", "2", "--eval_steps", "0", "--save_steps", "0", "--log_with", "none"]


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_step_benchmark_splits_the_step(tmp_path):
    run_script(
        "benchmark_step.py",
        "--model_configs",
        "tests/tiny_model.yaml",
        "--num_probes",
        "2",
        "--batch_size",
        "2",
        "--seq_len",
        "8",
        "--steps",
        "1",
        "--probes_per_forward",
        "1",
        "2",
        "--output_dir",
        str(tmp_path),
    )
    table = rows(tmp_path / "step.csv")
    assert [r["probes_per_forward"] for r in table] == ["1", "2"]
    for row in table:
        parts = sum(float(row[k]) for k in ("forward_seconds", "perturb_seconds", "update_seconds"))
        assert abs(parts - float(row["step_seconds"])) < 1e-6 and float(row["forward_seconds"]) > 0
    assert (tmp_path / "step.png").stat().st_size > 0


def test_memory_benchmark_measures_every_mode_and_context(tmp_path):
    run_script(
        "benchmark_memory.py",
        "--model_config",
        "tests/tiny_model.yaml",
        "--contexts",
        "64",
        "512",
        "--memory_limit_gb",
        "6",
        "--output_dir",
        str(tmp_path),
    )
    table = {(r["mode"], int(r["context"])): r for r in rows(tmp_path / "memory.csv")}
    modes = ("inference", "zo", "readout+zo", "one_step", "bptt")
    assert set(table) == {(mode, context) for mode in modes for context in (64, 512)}
    assert all(r["status"] == "ok" and float(r["peak_rss_mb"]) > float(r["rss_before_mb"]) > 0 for r in table.values())
    for context in (64, 512):  # a ZO step holds one copy of theta more than inference: tiny next to the runtime
        for mode in ("zo", "readout+zo", "one_step"):  # a backward per chunk: constant in context, like ZO
            assert float(table[mode, context]["peak_rss_mb"]) < 1.05 * float(table["inference", context]["peak_rss_mb"])
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_reproduction_runs_and_summarises_the_overfitting_experiment(tmp_path):
    run_script("reproduce.py", "--experiments", "overfit", "--max_steps", "2", "--output_dir", str(tmp_path))
    summary = rows(tmp_path / "summary.csv")
    assert [r["run"] for r in summary] == ["zo-96-eps0.1", "zo-96-eps0.01", "bptt-sgd", "bptt-sgd-lr1", "bptt-adamw"]
    assert all(r["steps"] == "2" and float(r["final_train_loss"]) > 0 for r in summary)
    assert (tmp_path / "overfit.png").stat().st_size > 0
    (tmp_path / "overfit.png").unlink()
    run_script("reproduce.py", "--experiments", "overfit", "--replot", "--output_dir", str(tmp_path))
    assert rows(tmp_path / "summary.csv") == summary and (tmp_path / "overfit.png").stat().st_size > 0


def test_estimator_benchmark_runs_every_section_and_reports_the_zo_contribution(tmp_path):
    tiny = " ".join(FAST_TRAINING)
    methods = ["--methods", "one_step_only", "one_step+zo_bias"]
    budget = ["--seconds", "1", "--evaluations", "1", "--recall_length", "4", "--train_arguments", tiny]
    output = ["--output_dir", str(tmp_path)]
    run_script("benchmark_estimators.py", "--sections", "lm", "memory", "cosine", *methods, *budget, *output)
    table = rows(tmp_path / "estimators.csv")
    runs = {(r["section"], r["method"]): r for r in table if r["section"] != "cosine"}
    assert set(runs) == {(s, m) for s in ("lm", "memory") for m in ("one_step_only", "one_step+zo_bias")}
    hybrid, alone = runs["lm", "one_step+zo_bias"], runs["lm", "one_step_only"]
    assert float(hybrid["zo_contribution"]) == round(float(alone["eval_loss"]) - float(hybrid["eval_loss"]), 4)
    assert runs["memory", "one_step+zo_bias"]["zo_contribution_in_distribution"] != ""
    assert all(float(r["training_seconds"]) < 10 for r in runs.values())  # the budget stops every run
    cosines = {(r["estimator"], r["probes"]): float(r["cosine"]) for r in table if r["section"] == "cosine"}
    assert cosines["one-step gradient", "0"] > 0.5 > cosines["CD-RGE, isotropic", "16"]
    assert (tmp_path / "estimators_lm.png").stat().st_size > 0 and (tmp_path / "estimators_memory.png").is_file()
    (tmp_path / "estimators_lm.png").unlink()
    run_script("benchmark_estimators.py", "--sections", "lm", "memory", *methods, "--replot", *output)
    replotted = rows(tmp_path / "estimators.csv")
    assert replotted == [{key: r[key] for key in replotted[0]} for r in table if r["section"] != "cosine"]
    assert (tmp_path / "estimators_lm.png").stat().st_size > 0


def test_communication_and_recurrence_benchmarks_run(tmp_path):
    run_script("benchmark_communication.py", "--num_probes", "96", "--output_dir", str(tmp_path))
    table = rows(tmp_path / "communication.csv")
    assert [r["shape"] for r in table] == ["tiny", "small", "medium", "large", "xlarge", "xxlarge"]
    assert all(int(r["zo_scalars_bytes"]) == 16 * 96 for r in table)
    assert int(table[4]["ddp_allreduce_bytes"]) == 4 * int(table[4]["parameters"])
    run_script(
        "benchmark_recurrence.py",
        "--hidden_sizes",
        "32",
        "--crossover_hidden",
        "64",
        "--crossover_heads",
        "1",
        "2",
        "--repeats",
        "1",
        "--seq_len",
        "8",
        "--output_dir",
        str(tmp_path),
    )
    assert len(rows(tmp_path / "recurrence.csv")) == 4 + 4


def test_population_benchmark_compares_batched_sequential_and_plain_generation(tmp_path):
    start = tmp_path / "start"
    run_script("train.py", "--output_dir", str(start), *TWO_QUIET_STEPS)
    population = ["--model", str(start), "--members", "4", "--ranks", "1", "--prompts", "2", "--max_new_tokens", "3"]
    population += ["--min_seconds", "0", "--api_steps", "4", "--output_dir", str(tmp_path)]
    run_script("benchmark_population.py", *population)
    table = rows(tmp_path / "population.csv")
    modes_and_ranks = [
        ("generate", ""),
        ("batched", "1"),
        ("sequential", "1"),
        ("sequential", "0"),
        ("ESTrainer (Python API)", "1"),
    ]
    assert [(r["mode"], r["rank"]) for r in table] == modes_and_ranks
    assert all(float(r["completions_per_s"]) > 0 and int(r["rows"]) == 8 for r in table[:4])
    assert float(table[4]["bare_step_seconds"]) > 0 and float(table[4]["api_overhead"]) > -1
    assert float(table[1]["speedup_vs_sequential"]) > 0 and (tmp_path / "population.png").stat().st_size > 0


def test_rewards_benchmark_runs_every_method_and_the_memory_probe(tmp_path):
    start = tmp_path / "start"
    run_script("train.py", "--output_dir", str(start), *TWO_QUIET_STEPS)
    kjv = ["--start", str(start), "--seconds", "1", "--seeds", "0", "--grpo_lrs", "1e-4", "--eval_prompts", "2"]
    kjv += ["--group", "2", "--prompts_per_step", "2", "--max_new_tokens", "4"]
    kjv += ["--memory", "--memory_lengths", "4", "--es_populations", "4x1", "4xfull", "--output_dir", str(tmp_path)]
    run_script("benchmark_rewards.py", *kjv)
    table = rows(tmp_path / "rewards_kjv.csv")
    assert [r["method"] for r in table] == ["start", "es 4x1", "es 4xfull", "grpo lr=0.0001", "one_step_pg"]
    assert all(r["error"] == "" for r in table if "error" in r) and all(int(r["steps"]) >= 0 for r in table)
    assert all(int(r["rollouts"]) == int(r["steps"]) * (4 * 2 if "es" in r["method"] else 2 * 2) for r in table[1:])
    assert [r["mode"] for r in rows(tmp_path / "rewards_memory.csv")] == ["generate", "es_step"]
    assert (tmp_path / "rewards_kjv.png").stat().st_size > 0 and "## es 4x1 seed 0" in (
        tmp_path / "rewards_kjv_samples.md"
    ).read_text()
    task = tmp_path / "add"
    bptt_on_add = ["--task", "add", "--task_max_length", "4", "--model_config", "tiny", "--estimator", "bptt"]
    quiet = ["--max_steps", "2", "--eval_steps", "0", "--save_steps", "0", "--log_with", "none"]
    run_script("train.py", "--output_dir", str(task), *bptt_on_add, *quiet)
    on_add = ["--start", str(task), "--prompts", "add", "--task_max_length", "4", "--methods", "es_pass4", "ce"]
    on_add += ["--seconds", "1", "--seeds", "0", "--eval_prompts", "2", "--prompts_per_step", "2"]
    run_script("benchmark_rewards.py", *on_add, "--output_dir", str(tmp_path))
    table = rows(tmp_path / "rewards_add.csv")
    assert [r["method"] for r in table] == ["start", "es_pass4 64x1", "ce"] and all(not r.get("error") for r in table)
    assert all(0 <= float(r["exact_match"]) <= 1 and "pass@4" in r for r in table)
