"""Benchmarks are scripts, not timed tests: here they only have to run on tiny settings and write their files."""

import csv

from conftest import run_script


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
        "--output_dir",
        str(tmp_path),
    )
    (row,) = rows(tmp_path / "step.csv")
    parts = sum(float(row[k]) for k in ("forward_seconds", "perturb_seconds", "update_seconds"))
    assert abs(parts - float(row["step_seconds"])) < 1e-6 and float(row["forward_seconds"]) > 0
    assert (tmp_path / "step.png").stat().st_size > 0


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
