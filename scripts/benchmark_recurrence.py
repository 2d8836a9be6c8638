"""Forward throughput of ZooRnn's CPU recurrence against torch.nn.LSTM / nn.GRU, and the dense-vs-loop crossover.

Part 1 times one recurrent layer (input projection included, as nn.LSTM does it) at equal single-head shapes.
Part 2 times the two CPU paths over head counts at two hidden sizes: the evidence for DENSE_MAX_HIDDEN.
Writes <output_dir>/recurrence.csv and recurrence.png; prints a table.

    python scripts/benchmark_recurrence.py [--repeats 5] [--output_dir outputs/benchmarks]
"""

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from hf_zoo_rnn.modeling_zoo_rnn import TORCH_CELLS  # noqa: E402


@dataclass
class BenchmarkArguments:
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where the CSV and PNG go"})
    repeats: int = field(default=5, metadata={"help": "timed repetitions per point (after one warm-up)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    seq_len: int = field(default=256, metadata={"help": "time steps per forward"})
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 256, 512, 1024], metadata={"help": "part 1"})
    crossover_hidden: list[int] = field(default_factory=lambda: [512, 1600], metadata={"help": "part 2 sizes"})
    crossover_heads: list[int] = field(default_factory=lambda: [1, 4, 16, 32, 64], metadata={"help": "part 2"})


def seconds_per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def ours(cell: str, kind: str, x: torch.Tensor, heads: int):
    hidden = x.shape[-1]
    gates, states = (4, 2) if cell == "lstm" else (3, 1)
    W = torch.randn(gates * hidden, hidden) / hidden**0.5
    R = torch.randn(gates, heads, hidden // heads, hidden // heads) / (hidden // heads) ** 0.5
    b = torch.zeros(4, heads, hidden // heads)
    state = torch.zeros(states, x.shape[0], heads, hidden // heads)
    return lambda: TORCH_CELLS[cell, kind](x, W, R, b, state)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = args.batch_size * args.seq_len
    rows = []
    with torch.inference_mode():
        for hidden in args.hidden_sizes:
            x = torch.randn(args.batch_size, args.seq_len, hidden)
            for cell, reference in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
                torch_rnn = reference(hidden, hidden, batch_first=True)
                t_ref = seconds_per_call(lambda rnn=torch_rnn, x=x: rnn(x), args.repeats)
                t_ours = seconds_per_call(ours(cell, "dense", x, heads=1), args.repeats)
                rows.append(dict(part="single_head", cell=cell, hidden=hidden, heads=1, path="torch.nn", seconds=t_ref))
                rows.append(dict(part="single_head", cell=cell, hidden=hidden, heads=1, path="zoo_rnn", seconds=t_ours))
                print(
                    f"{cell} H={hidden:5d}  nn: {tokens / t_ref:9.0f} tok/s  zoo_rnn: {tokens / t_ours:9.0f} tok/s"
                    f"  ratio {t_ref / t_ours:.2f}x"
                )
        for hidden in args.crossover_hidden:
            x = torch.randn(args.batch_size, args.seq_len, hidden)
            for heads in args.crossover_heads:
                for kind in ("dense", "loop"):
                    t = seconds_per_call(ours("lstm", kind, x, heads), args.repeats)
                    rows.append(dict(part="crossover", cell="lstm", hidden=hidden, heads=heads, path=kind, seconds=t))
                    print(f"lstm H={hidden} heads={heads:3d} {kind:5s}: {tokens / t:9.0f} tok/s")
    for row in rows:
        row["tokens_per_s"] = tokens / row["seconds"]
    with open(out / "recurrence.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "recurrence.png", args)
    print(f"wrote {out / 'recurrence.csv'} and {out / 'recurrence.png'}")


def plot(rows, path: Path, args: BenchmarkArguments) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for cell in ("lstm", "gru"):
        for source, style in (("torch.nn", "--"), ("zoo_rnn", "-")):
            points = [r for r in rows if r["part"] == "single_head" and r["cell"] == cell and r["path"] == source]
            left.plot(
                [r["hidden"] for r in points],
                [r["tokens_per_s"] for r in points],
                style,
                marker="o",
                label=f"{source} {cell}",
            )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="hidden size (1 head)",
        ylabel="tokens/s",
        title=f"CPU forward, batch {args.batch_size} x {args.seq_len}",
    )
    left.legend()
    for hidden in args.crossover_hidden:
        for kind in ("dense", "loop"):
            points = [r for r in rows if r["part"] == "crossover" and r["path"] == kind and r["hidden"] == hidden]
            right.plot(
                [r["heads"] for r in points],
                [r["tokens_per_s"] for r in points],
                marker="o",
                label=f"{kind} H={hidden}",
            )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="heads",
        ylabel="tokens/s",
        title="LSTM: dense ATen kernel vs head loop",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
