"""Peak memory of inference, a ZO training step and a BPTT training step on the same model, against context length.

Each (mode, context) runs in a fresh interpreter under an address-space limit, so its peak RSS is its own and a
BPTT step that does not fit ends as "oom" instead of swapping the machine. Writes <output_dir>/memory.csv and
memory.png.

    python scripts/benchmark_memory.py [--model_config configs/model/tiny.yaml] [--num_probes 2]
        [--contexts 1024 16384 131072 1048576] [--memory_limit_gb 8]

inference   one forward with labels under inference_mode: the context is fed in chunks, the state carried
zo          one ZOOptimizer step (2K such forwards, an exact-restore copy of theta, the update)
readout+zo  a hybrid step: the readout's exact gradient (a backward per chunk) and AdamW, ZO on the rest
one_step    the one-step gradient of every parameter (a backward per chunk, one recurrent step deep) and AdamW
bptt        one full backpropagation through the whole context and an AdamW step: every step's activations are kept
"""

import csv
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, HfArgumentParser  # noqa: E402

import hf_zoo_rnn  # noqa: E402, F401  (registers the Auto classes)
from hf_zoo_rnn.config_files import load_model_config  # noqa: E402
from hf_zoo_rnn.estimators.local import partition_parameters  # noqa: E402
from hf_zoo_rnn.forwards.local import accumulate_local_gradients  # noqa: E402
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer  # noqa: E402

MODES = ("inference", "zo", "readout+zo", "one_step", "bptt")


@dataclass
class MemoryBenchmarkArguments:
    model_config: str = field(default="configs/model/tiny.yaml", metadata={"help": "model YAML"})
    contexts: list[int] = field(
        default_factory=lambda: [1024, 16384, 131072, 1048576], metadata={"help": "tokens per sequence (batch 1)"}
    )
    num_probes: int = field(default=2, metadata={"help": "probes K of the ZO step"})
    memory_limit_gb: float = field(default=8.0, metadata={"help": "address-space limit of each measurement"})
    output_dir: str = field(default="outputs/benchmarks", metadata={"help": "where memory.csv and memory.png go"})
    worker: str | None = field(default=None, metadata={"help": "internal: run one measurement as MODE:CONTEXT"})


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args: MemoryBenchmarkArguments, mode: str, context: int) -> dict:
    """Runs in the worker process: build the model and inputs, then one workload; memory read around it."""
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_model_config(args.model_config))
    ids = torch.randint(0, model.config.vocab_size, (1, context))

    def loss_fn():
        return model(ids, labels=ids, logits_to_keep=1).loss

    model.eval().requires_grad_(mode == "bptt")
    zo_names, local_names = partition_parameters(
        model, {"readout+zo": "readout", "one_step": "one_step"}.get(mode, "none"), "auto"
    )
    zo = ZOOptimizer(model, ZOConfig(num_probes=args.num_probes, lr=1e-3), zo_names) if "zo" in mode else None
    trained = (
        [p for n, p in model.named_parameters() if n in local_names] if mode != "bptt" else list(model.parameters())
    )
    for param in trained:
        param.requires_grad_(True)
    adamw = torch.optim.AdamW(trained, lr=1e-3) if trained else None
    before = current_rss_mb()
    started = time.perf_counter()
    if mode == "inference":
        with torch.inference_mode():
            loss_fn()
    elif mode == "zo":
        zo.step(loss_fn)
    elif mode == "bptt":
        loss_fn().backward()
        adamw.step()
    else:
        clean = accumulate_local_gradients(model, ids, ids, "readout" if mode == "readout+zo" else "one_step")
        if zo is not None:
            zo.step(loss_fn, clean_loss=clean)
        adamw.step()
    return {"seconds": time.perf_counter() - started, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def run_worker(args: MemoryBenchmarkArguments, mode: str, context: int) -> dict:
    command = [sys.executable, __file__, "--model_config", args.model_config, "--num_probes", str(args.num_probes)]
    command += ["--memory_limit_gb", str(args.memory_limit_gb), "--worker", f"{mode}:{context}"]
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"mode": mode, "context": context}
    if done.returncode == 0:
        return row | {"status": "ok"} | json.loads(done.stdout.strip().splitlines()[-1])
    if "can't allocate memory" in done.stderr or "MemoryError" in done.stderr:
        return row | {"status": "oom"}
    raise RuntimeError(f"{mode} at context {context} failed:\n{done.stderr[-2000:]}")


def main() -> None:
    (args,) = HfArgumentParser(MemoryBenchmarkArguments).parse_args_into_dataclasses()
    if args.worker:
        mode, context = args.worker.split(":")
        print(json.dumps(measure(args, mode, int(context))))
        return
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for context in args.contexts:
        for mode in MODES:
            row = run_worker(args, mode, context)
            rows.append(row)
            if row["status"] == "ok":
                work_mb = row["peak_rss_mb"] - row["rss_before_mb"]
                print(
                    f"{mode:>9} {context:>9,} tokens: peak RSS {row['peak_rss_mb']:8.1f} MB "
                    f"(+{work_mb:.1f} MB for the work), {row['seconds']:.1f} s",
                    flush=True,
                )
            else:
                print(f"{mode:>9} {context:>9,} tokens: out of memory (limit {args.memory_limit_gb} GiB)", flush=True)
    fieldnames = ["mode", "context", "status", "peak_rss_mb", "rss_before_mb", "seconds"]
    with open(out / "memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        fitted = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        ax.plot([r["context"] for r in fitted], [r["peak_rss_mb"] for r in fitted], marker="o", label=mode)
        failed = [r["context"] for r in rows if r["mode"] == mode and r["status"] == "oom"]
        if failed:
            limit_mb = [args.memory_limit_gb * 1024] * len(failed)
            ax.scatter(failed, limit_mb, marker="x", color="red", label=f"{mode}: out of memory")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context (tokens, batch 1)",
        ylabel="peak RSS (MB)",
        title=f"Memory vs context, {Path(args.model_config).stem}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    print(f"wrote {out / 'memory.csv'} and {out / 'memory.png'}")


if __name__ == "__main__":
    main()
