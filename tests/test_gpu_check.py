"""scripts/gpu_check.py's plumbing, on the CPU backends at toy sizes (--dry_run): every part runs in its own
interpreter, reports rows, and the CSV and markdown table are written. On a GPU the same script runs the real sizes."""

import csv
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_part_on_cpu(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry_run", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    assert {r["part"] for r in rows} == {"parity", "throughput", "table1", "memory", "product", "population"}
    bad = [r for r in rows if r["status"] not in ("pass", "ok", "n/a")]
    assert not bad, bad
    parity = [r for r in rows if r["part"] == "parity"]
    assert len(parity) == 4 and all(float(r["value"]) > 0 for r in parity)  # a real comparison, not a copy
    report = (tmp_path / "gpu_check.md").read_text()
    assert "**Environment:** device CPU (no CUDA)" in report and "| lstm vanilla float32 |" in report
    assert any(r["check"] == "saved model: device logits vs CPU" and r["status"] == "pass" for r in rows)
    population = [r for r in rows if r["part"] == "population"]
    assert [r["unit"] for r in population] == ["completions/s", "completions/s", "ratio"]
    assert all(float(r["value"]) > 0 for r in population)


def test_a_part_that_overruns_its_limit_costs_only_that_part(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry_run", "--parts", "parity", "memory"]
    command += ["--part_seconds", "0.001", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    assert [r["status"] for r in rows] == ["incomplete", "incomplete"]
    assert all("stopped at its 0 s limit" in r["detail"] for r in rows)
