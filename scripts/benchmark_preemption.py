"""What a preemption costs: seconds from SIGTERM to exit, and the size of the checkpoint it saves.

For each launcher, the embedded default run (or `--train_arguments`) is started, signalled with SIGTERM once it has
logged `--signal_after` steps, and timed until the launcher exits (its exit code, whether anything printed a traceback,
its last line); the checkpoint it saved is listed file by file.

    python scripts/benchmark_preemption.py [--launchers direct cpu-1 cpu-2] [--signal_after 20]
                                           [--output_dir outputs/benchmarks]

Writes preemption.csv (one row per launcher) and preemption_files.csv (the saved checkpoint's files).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_zoo_rnn.training.reporting import write_table

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "hf_zoo_rnn.train"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
LAUNCHERS = {
    "direct": [sys.executable, *TRAIN],
    "cpu-1": [*ACCELERATE, str(ROOT / "hf_zoo_rnn/configs/accelerate/cpu-1.yaml"), *TRAIN],
    "cpu-2": [*ACCELERATE, str(ROOT / "hf_zoo_rnn/configs/accelerate/cpu-2.yaml"), *TRAIN],
}


@dataclass
class PreemptionBenchmarkArguments:
    launchers: list[str] = field(default_factory=lambda: list(LAUNCHERS), metadata={"help": "direct, cpu-1, cpu-2"})
    signal_after: int = field(default=20, metadata={"help": "logged steps before the SIGTERM"})
    train_arguments: list[str] = field(
        default_factory=lambda: ["--log_with", "none", "--eval_steps", "0", "--logging_steps", "1"],
        metadata={"help": "arguments for the training run (the embedded default plus these)"},
    )
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where the CSVs and runs go"})


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return sum(1 for line in lines if line.endswith("}") and "train_loss" in json.loads(line))


def measure(name: str, args: PreemptionBenchmarkArguments, output_dir: Path) -> tuple[dict, list[dict]]:
    run = output_dir / f"preemption-{name}"
    shutil.rmtree(run, ignore_errors=True)
    command = [*LAUNCHERS[name], "--output_dir", str(run), *args.train_arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while logged_steps(run) < args.signal_after and launcher.poll() is None:
        time.sleep(0.01)
    signalled = time.perf_counter()
    launcher.send_signal(signal.SIGTERM)
    stderr = launcher.communicate()[1]
    seconds = time.perf_counter() - signalled
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    saved = [path for path in run.glob("checkpoint-*") if path.is_dir()]
    files = [
        {"launcher": name, "file": str(path.relative_to(saved[-1])), "kb": round(path.stat().st_size / 1024, 1)}
        for path in sorted(saved[-1].rglob("*"))
        if saved and path.is_file()
    ]
    row = {
        "launcher": name,
        "exit_code": launcher.returncode,
        "sigterm_to_exit_s": round(seconds, 2),
        "checkpoint": saved[-1].name if saved else None,
        "checkpoint_kb": round(sum(f["kb"] for f in files), 1),
        "traceback_printed": "Traceback" in stderr,
        "last_line": last,
    }
    return row, files


def main() -> None:
    (args,) = HfArgumentParser(PreemptionBenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for name in args.launchers:
        row, listed = measure(name, args, output_dir)
        rows.append(row)
        files += listed
    write_table(rows, output_dir / "preemption.csv")
    write_table(files, output_dir / "preemption_files.csv")


if __name__ == "__main__":
    main()
