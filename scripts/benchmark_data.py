"""Memory, resume-state size and speed of reading a local text file, against the file's size.

A text file is one document; it must stream in bounded segments, so that neither memory nor the state saved in
every checkpoint grows with it. For each size a file is generated (the KJV's verses, repeated; cached under
<output_dir>/data_files) and measured in a fresh interpreter:

  stream  every block of the file through PackedStream (the char tokenizer, 16 x 128 tokens per block), the resume
          state pickled every 1,000 blocks: peak RSS, RSS before reading, largest state, tokens/s
  train   python -m hf_zoo_rnn.train on the file for 20 steps (the default run: a BPE trained on its first 1M
          characters, the one-step gradient), a checkpoint at step 10: peak RSS and the size of process_0.{json,safetensors}

    python scripts/benchmark_data.py [--sizes_mb 10 100 1000] [--modes stream train] [--output_dir outputs/benchmarks]

Writes data.csv and data.png.
"""

import json
import pickle
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hf_zoo_rnn.data import PackedStream, char_tokenizer, open_text_source  # noqa: E402
from hf_zoo_rnn.data.corpus import kjv_path  # noqa: E402
from hf_zoo_rnn.training.reporting import write_table  # noqa: E402

MODES = ("stream", "train")
MB = 10**6


@dataclass
class DataBenchmarkArguments:
    sizes_mb: list[int] = field(default_factory=lambda: [10, 100, 1000], metadata={"help": "file sizes (10^6 bytes)"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": "stream and/or train"})
    output_dir: str = field(
        default="outputs/benchmarks", metadata={"help": "where data.csv, data.png and the files go"}
    )
    worker: str | None = field(default=None, metadata={"help": "internal: run one measurement as MODE:FILE"})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def generated_file(folder: Path, size_mb: int) -> Path:
    """A text file of size_mb x 10^6 bytes: the KJV's verses, one per line, over and over."""
    path = folder / f"kjv-{size_mb}mb.txt"
    if path.is_file() and path.stat().st_size == size_mb * MB:
        return path
    with open(kjv_path(), encoding="utf-8") as handle:
        verses = "".join(json.loads(line)["text"] + "\n" for line in handle).encode()
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        remaining = size_mb * MB
        while remaining:
            piece = verses[:remaining]
            out.write(piece)
            remaining -= len(piece)
    return path


def measure_stream(path: Path) -> dict:
    source = open_text_source(str(path), "train", validation_fraction=0)
    stream = PackedStream(source, char_tokenizer(), context_length=128, batch_size=16)
    rss_before = peak_rss_mb()
    started, blocks, largest_state = time.perf_counter(), 0, 0
    for _ in stream:
        blocks += 1
        if blocks % 1000 == 0:
            largest_state = max(largest_state, len(pickle.dumps(stream.state_dict())))
    seconds = time.perf_counter() - started
    return {
        "blocks": blocks,
        "tokens_per_second": round(blocks * 16 * 128 / seconds),
        "seconds": round(seconds, 1),
        "rss_before_reading_mb": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()),
        "largest_state_kb": round(largest_state / 1024, 1),
    }


def measure_training(path: Path, output_dir: Path) -> dict:
    run = output_dir / f"train-{path.stem}"
    command = [sys.executable, "-m", "hf_zoo_rnn.train", "--dataset", str(path), "--output_dir", str(run)]
    command += ["--max_steps", "20", "--save_steps", "10", "--eval_batches", "1", "--log_with", "none"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(max(r.get("peak_memory_mb", 0) for r in records)),
        "process_state_kb": round(sum(p.stat().st_size for p in (run / "checkpoint-10").glob("process_0.*")) / 1024, 1),
    }


def worker(spec: str, output_dir: Path) -> None:
    mode, path = spec.split(":", 1)
    result = measure_stream(Path(path)) if mode == "stream" else measure_training(Path(path), output_dir)
    print(json.dumps(result))


def plot(rows: list[dict], path: Path) -> None:
    fig, (memory, state) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            sizes = [r["file_mb"] for r in mine]
            memory.plot(sizes, [r["peak_rss_mb"] for r in mine], marker="o", label=f"{mode}: peak RSS")
            key = "largest_state_kb" if mode == "stream" else "process_state_kb"
            state.plot(sizes, [r[key] for r in mine], marker="o", label=f"{mode}: {key}")
    memory.set(xscale="log", xlabel="text file (MB)", ylabel="MB", title="peak memory", ylim=(0, None))
    state.set(xscale="log", xlabel="text file (MB)", ylabel="KB", title="resume state per process", ylim=(0, None))
    memory.legend()
    state.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    (args,) = HfArgumentParser(DataBenchmarkArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    if args.worker:
        worker(args.worker, output_dir)
        return
    unknown = set(args.modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    rows = []
    for size in args.sizes_mb:
        path = generated_file(output_dir / "data_files", size)
        for mode in args.modes:
            command = [sys.executable, __file__, "--worker", f"{mode}:{path}", "--output_dir", str(output_dir)]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append({"mode": mode, "file_mb": size, **json.loads(result.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    write_table(rows, output_dir / "data.csv")
    plot(rows, output_dir / "data.png")


if __name__ == "__main__":
    main()
