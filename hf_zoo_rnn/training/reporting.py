"""What a finished run leaves for people: a loss-curve PNG and a model card; and the tables scripts make of runs."""

import csv
import dataclasses
import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import ModelCard, ModelCardData  # noqa: E402

from .run_folder import OutputDirError  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "zoo_rnn.md"  # package data


def logged_metrics(output_dir: Path) -> list[dict]:
    """The records a run wrote to metrics.jsonl; a clear error when it never ran there."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: train that run first")
    return [json.loads(line) for line in path.read_text().splitlines()]


def append_record(path: Path, record: dict) -> None:
    """One logged record as a line of metrics.jsonl; a full disk is one error naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise OutputDirError(f"cannot write {path}: {error.strerror}") from error


RESULT = "RESULT "  # the line a benchmark's worker prints its row on


def run_worker(script: str, spec: str, label: str) -> dict:
    """A benchmark measurement in a fresh process of `script` (the same arguments, `--worker spec`, one thread): the
    row it printed after RESULT, or a row naming its error under `label`."""
    command = [sys.executable, script, *sys.argv[1:], "--worker", spec]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        return {label: spec, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[0][len(RESULT) :])


def write_table(rows: list[dict], path: Path) -> None:
    """Rows to CSV (columns: every key, in first-seen order), and one line per row on stdout."""
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items() if v is not None))


def plot_loss_curve(history: list[dict], path: Path, train_label: str) -> None:
    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label=train_label)
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="validation (clean loss)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="hf_zoo_rnn training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def flat_config(args, world_size: int) -> dict:
    """Every argument of the run, for the trackers (zero-order settings under their zo_ names)."""
    values = {}
    for prefix, group in (("", args.model), ("", args.data), ("", args.train), ("zo_", args.zo)):
        for key, value in dataclasses.asdict(group).items():
            values[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    values["world_size"] = world_size
    return values


def hardware(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores"


def duration(seconds: float) -> str:
    """1 h 2 min 5 s, 2 min 26 s, 4.2 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s"


def parameter_roles(model, roles: dict[str, str]) -> dict[str, tuple[list[str], int]]:
    """role -> (parameter names, element count); parameters without a role were frozen. Empty for BPTT, where
    every parameter is trained by backpropagation."""
    if not roles:
        return {}
    grouped: dict[str, tuple[list[str], int]] = {}
    for name, param in model.named_parameters():
        role = roles.get(name, "frozen (initial values)")
        names, count = grouped.get(role, ([], 0))
        grouped[role] = (names + [name], count + param.numel())
    return grouped


@dataclass
class RunSummary:
    """What a run's model card says about it: the trainer hands this over, the card reads nothing else."""

    method: str  # the estimator's one sentence (EstimatorSpec.describe)
    estimator_rows: list[tuple[str, str]]  # its rows of the training table (EstimatorSpec.card_rows)
    parameter_roles: dict[str, str]  # parameter name -> how it is trained
    training_data: str
    validation_data: str
    dataset: str | None  # a dataset to name in the card's metadata (None: built in)
    counters: dict
    world_size: int
    hardware: str
    peak_memory_mb: float
    unknown_tokens: int = 0


def write_model_card(output_dir: Path, model, run: RunSummary, final_metrics: dict) -> ModelCard:
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["custom_code", getattr(config, "cell", config.model_type), "zeroth-order", "flashrnn", "hf_zoo_rnn"],
        datasets=[run.dataset] if run.dataset else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        cell=getattr(config, "cell", config.model_type).upper(),
        parameters=f"{model.num_parameters():,}",
        config=config,
        method=run.method,
        estimator_rows=run.estimator_rows,
        unknown_tokens=run.unknown_tokens,
        train_time=duration(final_metrics["train_seconds"]) if "train_seconds" in final_metrics else None,
        step_time=duration(final_metrics["training_seconds"]) if "training_seconds" in final_metrics else None,
        training_data=run.training_data,
        validation_data=run.validation_data,
        counters=run.counters,
        world_size=run.world_size,
        metrics={k: f"{v:.4f}" for k, v in final_metrics.items()},
        peak_memory_mb=f"{run.peak_memory_mb:.0f}",
        hardware=run.hardware,
        roles=parameter_roles(model, run.parameter_roles),
    )
    card.save(output_dir / "README.md")
    return card
