"""The GPU path in one command: FlashRNN's kernels against the CPU path, throughput against cuDNN and the paper's
Table 1, memory against context length, and the product (train, generate, reload on CPU) on CUDA.

    python scripts/gpu_check.py [--parts parity throughput table1 memory product] [--output_dir outputs/gpu_check]
    python scripts/gpu_check.py --dry_run      # every part at toy sizes on the CPU backends (CI runs this)
    make gpu-check                             # on the GPU machine: install the carried wheels, then run this

Each part runs in a fresh interpreter under its own time limit (`--part_seconds`; about 13 minutes in all on a fresh
machine, most of it FlashRNN kernel builds: run it as two commands of --parts within a 10-minute limit), so a
backend that fails to compile, crashes or hangs costs that part only. Writes gpu_check.csv (part, check, value, unit,
status, detail) and gpu_check.md (the environment, then one table per part, ready for docs/BENCHMARKS.md).
"""

import csv
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_zoo_rnn import ZooRnnConfig, ZooRnnForCausalLM
from hf_zoo_rnn.config_files import load_model_config
from hf_zoo_rnn.estimators.probes import population_loss
from hf_zoo_rnn.forwards.local import accumulate_local_gradients
from hf_zoo_rnn.forwards.population import members_generate
from hf_zoo_rnn.zo import ZOConfig, ZOOptimizer

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("parity", "throughput", "table1", "memory", "product", "population")
# Measured on a fresh H200 (CUDA 13, docs/BENCHMARKS.md): every new (hidden size, batch) of FlashRNN's `cuda` kernel is
# a ~45 s build (the fused kernel does not build under CUDA 13): memory builds 4 shapes, product 3 or more
PART_SECONDS = {"parity": 100, "throughput": 100, "table1": 90, "memory": 240, "product": 200, "population": 80}
# the stack's stated parity tolerances (max |logit difference| against the fp64 CPU path)
TOLERANCE = {("cuda", "float32"): 1e-4, ("float32",): 1e-2, ("bfloat16",): 5e-2, ("vanilla", "float32"): 1e-5}


@dataclass
class GpuCheckArguments:
    parts: list[str] = field(default_factory=lambda: list(PARTS), metadata={"help": f"any of {PARTS}"})
    dry_run: bool = field(default=False, metadata={"help": "toy sizes on the CPU backends: checks the plumbing"})
    output_dir: str = field(default="outputs/gpu_check", metadata={"help": "where gpu_check.csv and .md go"})
    part_seconds: float = field(default=1.0, metadata={"help": "scale of every part's time limit"})
    worker: str | None = field(default=None, metadata={"help": "internal: run one part, print its rows as JSON"})


def row(part: str, check: str, value, unit: str, *, status: str = "ok", detail: str = "") -> dict:
    return {"part": part, "check": check, "value": value, "unit": unit, "status": status, "detail": detail}


def device_of(dry_run: bool) -> torch.device:
    return torch.device("cpu" if dry_run else "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def tolerance(backend: str, dtype: str) -> float:
    return TOLERANCE.get((backend, dtype), TOLERANCE[(dtype,)])


def environment() -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    driver = "none"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)",
        "driver": driver,
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "flashrnn": version("flashrnn"),
        "transformers": version("transformers"),
        "nvcc": shutil.which("nvcc") or "missing (FlashRNN's cuda/cuda_fused kernels cannot compile)",
        "ninja": shutil.which("ninja") or "missing",
    }


# -- parts: each yields rows --------------------------------------------------------------------------------------


def parity(dry_run: bool):
    """Each FlashRNN backend against the fp64 CPU path on the same parameters: logits and last state of a long
    sequence run as two calls with the state carried (each call several chunks)."""
    device = device_of(dry_run)
    backends = ["vanilla"] if dry_run else ["cuda", "cuda_fused", "triton_fused"]
    heads, dim, steps = (2, 16, 24) if dry_run else (4, 64, 512)
    for cell in ("lstm", "gru"):
        shape = {
            "cell": cell,
            "vocab_size": 128,
            "embedding_size": 64,
            "num_heads": heads,
            "head_dim": dim,
            "num_hidden_layers": 2,
            "chunk_size": steps // 4,
        }
        reference_model = ZooRnnForCausalLM(ZooRnnConfig(**shape, backend="torch")).double().eval()
        ids = torch.randint(0, 128, (8, steps))
        with torch.no_grad():
            reference = reference_model(ids)
        for backend in backends:
            for dtype in ("float32", "bfloat16"):
                check = f"{cell} {backend} {dtype}"
                if backend == "triton_fused" and cell == "gru":
                    yield row("parity", check, "", "", status="n/a", detail="triton_fused is LSTM only")
                    continue
                model = ZooRnnForCausalLM(ZooRnnConfig(**shape, backend=backend))
                model.load_state_dict(reference_model.state_dict())
                model = model.to(device, getattr(torch, dtype)).eval()
                halves = ids.to(device).chunk(2, dim=1)
                try:
                    with torch.no_grad():
                        compile_s, first = timed(partial(model, halves[0]), device)
                        run_s, second = timed(partial(model, halves[1], state=first.state), device)
                except Exception as error:  # a kernel that cannot compile or run fails this check only
                    yield row("parity", check, "", "", status="error", detail=f"{type(error).__name__}: {error}"[:300])
                    continue
                logits = torch.cat([first.logits, second.logits], dim=1).double().cpu()
                error = (logits - reference.logits).abs().max().item()
                state_error = max(
                    (a.double().cpu() - b).abs().max().item()
                    for a, b in zip(second.state, reference.state, strict=True)
                )
                limit = tolerance(backend, dtype)
                status = "pass" if max(error, state_error) <= limit else "FAIL"
                detail = (
                    f"state {state_error:.1e}, tolerance {limit:g}; first call {compile_s:.2f} s, then {run_s:.3f} s"
                )
                yield row("parity", check, f"{error:.2e}", "max |logit diff|", status=status, detail=detail)


def forward_tokens_per_second(model, inputs, device, repeats: int = 3) -> float:
    with torch.inference_mode():
        model(inputs)  # warm-up (and kernel compilation)
        seconds = min(timed(partial(model, inputs), device)[0] for _ in range(repeats))
    return inputs.shape[0] * inputs.shape[1] / seconds


def throughput(dry_run: bool):
    device = device_of(dry_run)
    dtype = torch.float32 if dry_run else torch.bfloat16
    shapes = ["tiny"] if dry_run else ["tiny", "small", "medium", "large", "xlarge"]
    batch, steps = (2, 16) if dry_run else (64, 256)
    for name in shapes:
        config = load_model_config(name)
        ids = torch.randint(0, config.vocab_size, (batch, steps), device=device)
        backends = ["torch", "vanilla"] if dry_run else ["cuda", "cuda_fused"]
        for backend in backends:
            model = ZooRnnForCausalLM(ZooRnnConfig(**{**config.to_diff_dict(), "backend": backend}))
            model = model.to(device, dtype).eval()
            try:
                rate = forward_tokens_per_second(model, ids, device)
                yield row(
                    "throughput", f"{name} forward, {backend}", round(rate), "tokens/s", detail=f"{batch}x{steps}"
                )
            except Exception as error:
                yield row("throughput", f"{name} forward, {backend}", "", "", status="error", detail=f"{error}"[:300])
        cudnn = torch.nn.LSTM(config.embedding_size, config.hidden_size, batch_first=True).to(device, dtype).eval()
        embedded = torch.randn(batch, steps, config.embedding_size, device=device, dtype=dtype)
        label = "torch.nn.LSTM (cuDNN, dense)" if device.type == "cuda" else "torch.nn.LSTM (dense)"
        rate = forward_tokens_per_second(cudnn, embedded, device)
        yield row("throughput", f"{name} forward, {label}", round(rate), "tokens/s", detail=f"{batch}x{steps}")
    # low-rank probes as one batch against plain inference of the same [2P x B] batch (EGGROLL: 91% on a GH200)
    config = load_model_config("tiny" if dry_run else "medium")
    model = ZooRnnForCausalLM(config).to(device, dtype).eval().requires_grad_(False)
    probes, ids = (
        (4, torch.randint(0, 100, (2, 16), device=device))
        if dry_run
        else (32, torch.randint(0, 100, (16, 64), device=device))
    )
    zo_config = ZOConfig(
        num_probes=probes, perturbation="lowrank", probes_per_forward=probes, stacked_memory_mb=1e9, lr=1e-4, eps=1e-3
    )
    zo = ZOOptimizer(model, zo_config)
    stacked = population_loss(model, zo.names, ids, ids, members=True)

    def loss_fn():
        return model(ids, labels=ids, logits_to_keep=1).loss

    zo.step(loss_fn, population_loss=stacked)
    seconds = timed(partial(zo.step, loss_fn, population_loss=stacked), device)[0]
    member_rate = 2 * probes * ids.numel() / seconds
    plain = forward_tokens_per_second(model, ids.repeat(2 * probes, 1), device)
    check = f"{config.num_heads}x{config.head_dim} low-rank K={probes} as one batch"
    detail = f"{member_rate / plain:.0%} of plain inference"
    yield row("throughput", check, round(member_rate), "probe-tokens/s", detail=detail)
    # the one-step gradient and BPTT at equal batch
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one_step():
        accumulate_local_gradients(model, ids, ids, "one_step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bptt():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for label, step in (("one-step gradient step", one_step), ("BPTT + AdamW step", bptt)):
        step()
        seconds = min(timed(step, device)[0] for _ in range(2))
        check = f"{config.num_heads}x{config.head_dim} {label}"
        detail = f"{seconds * 1000:.1f} ms per step"
        yield row("throughput", check, round(ids.numel() / seconds), "tokens/s", detail=detail)


def table1(dry_run: bool):
    """A 96-probe CD-RGE step on the paper's 1.1B model, batch 1024 x 10 tokens (Table 1: 145 s on one A40)."""
    device = device_of(dry_run)
    name, batch, measured, full = ("tiny", 8, 2, 8) if dry_run else ("xlarge", 1024, 8, 96)
    config = load_model_config(name)
    dtype = torch.float32 if dry_run else torch.bfloat16
    with torch.device(device):
        model = ZooRnnForCausalLM(config).to(dtype).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (batch, 10), device=device)
    zo = ZOOptimizer(model, ZOConfig(num_probes=measured, lr=1e-4, eps=1e-3))

    def loss_fn():
        return model(ids, labels=ids, logits_to_keep=1).loss

    warm = timed(partial(zo.step, loss_fn), device)[0]
    seconds = timed(partial(zo.step, loss_fn), device)[0]
    per_probe = seconds / measured
    check = f"{name} ({model.num_parameters():,} parameters) {measured}-probe step"
    yield row("table1", check, round(seconds, 2), "s", detail=f"first step {warm:.1f} s (kernel compilation)")
    check = f"{name} {full}-probe step, from {measured} probes x {full // measured}"
    paper = "paper, Table 1: 145 s on one A40, 4.4 s on 8 A40"
    yield row("table1", check, round(per_probe * full, 1), "s", detail=paper)


def peak_mib(fn, device: torch.device) -> float:
    """Peak device memory while fn() runs (0 on CPU, where scripts/benchmark_memory.py measures RSS)."""
    if device.type != "cuda":
        fn()
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20


def zo_step_of(model, ids) -> None:
    def loss_fn():
        return model(ids, labels=ids, logits_to_keep=1).loss

    ZOOptimizer(model, ZOConfig(num_probes=2, lr=1e-4, eps=1e-3)).step(loss_fn)


def memory(dry_run: bool):
    """Peak memory of a ZO step against inference, over context length; and the largest model whose step fits."""
    device = device_of(dry_run)
    dtype = torch.float32 if dry_run else torch.bfloat16
    contexts = [64, 256] if dry_run else [1024, 16384, 131072]
    ladder = [("tiny", 1), ("tiny", 2)] if dry_run else [("xlarge", 1), ("xxlarge", 1), ("xxlarge", 4)]
    config = load_model_config("tiny" if dry_run else "large")
    with torch.device(device):
        model = ZooRnnForCausalLM(config).to(dtype).eval().requires_grad_(False)
    for context in contexts:
        ids = torch.randint(0, config.vocab_size, (1, context), device=device)
        with torch.no_grad():
            inference = peak_mib(partial(model, ids, labels=ids, logits_to_keep=1), device)
            step = peak_mib(partial(zo_step_of, model, ids), device)
        ratio = round(step / inference, 3) if inference else ""
        check = f"{config.num_heads}x{config.head_dim}, context {context:,}: ZO step / inference"
        yield row("memory", check, ratio, "x", detail=f"{step:.0f} MiB vs {inference:.0f} MiB")
    model = None
    for name, scale in ladder:
        config = load_model_config(name)
        if scale > 1:
            config = ZooRnnConfig(**{**config.to_diff_dict(), "num_heads": config.num_heads * scale})
        label = f"{name} x{scale} heads" if scale > 1 else name
        try:
            with torch.device(device):
                model = ZooRnnForCausalLM(config).to(dtype).eval().requires_grad_(False)
            ids = torch.randint(0, config.vocab_size, (1, 128), device=device)
            with torch.no_grad():
                peak = peak_mib(partial(zo_step_of, model, ids), device) / 1024
            yield row("memory", f"ZO step fits: {label} ({model.num_parameters():,} parameters)", round(peak, 1), "GiB")
        except torch.OutOfMemoryError:
            detail = "the largest that fits is the row above"
            yield row("memory", f"ZO step fits: {label}", "", "", status="OOM", detail=detail)
            return
        finally:
            model = None


def product(dry_run: bool):
    """accelerate launch scripts/train.py on the device, generate from what it saved, reload it on CPU."""
    out = Path(tempfile.mkdtemp(prefix="gpu-check-product-")) / "run"
    layout = "cpu-1" if dry_run else "multi-gpu"
    accelerate_config = ROOT / f"hf_zoo_rnn/configs/accelerate/{layout}.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config)]
    launch += ["--num_processes", "1", str(ROOT / "scripts/train.py"), "--output_dir", str(out)]
    launch += ["--max_steps", "20", "--log_with", "none", "--eval_steps", "0", "--eval_batches", "2"]
    launch += ["--tokenizer_sample_chars", "200000"]
    started = time.perf_counter()
    print("product: training 20 steps", file=sys.stderr, flush=True)  # each stage names itself in a time-out's row
    result = subprocess.run(launch, capture_output=True, text=True)
    print(result.stderr[-1500:], file=sys.stderr, flush=True)
    if result.returncode != 0:
        errors = [  # the child's exception, not torchrun's banner
            line
            for line in result.stderr.splitlines()
            if re.search(r"\w+(Error|Exception): ", line) and "ChildFailedError" not in line
        ]
        detail = (errors[-1] if errors else result.stderr[-300:])[:300]
        yield row("product", "accelerate launch scripts/train.py", "", "", status="error", detail=detail)
        return
    eval_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("eval_loss")
    seconds = round(time.perf_counter() - started, 1)
    yield row("product", "train 20 steps (default run)", seconds, "s", detail=f"eval_loss {eval_loss:.3f}")
    print("product: generating from the saved model", file=sys.stderr, flush=True)
    generate = [sys.executable, str(ROOT / "scripts/generate.py"), "--model", str(out), "--max_new_tokens", "20"]
    text = subprocess.run(generate, capture_output=True, text=True)
    status = "ok" if text.returncode == 0 and text.stdout.strip() else "error"
    detail = (text.stdout or text.stderr)[-200:]
    yield row("product", "generate.py", len(text.stdout), "characters", status=status, detail=detail)
    print("product: reloading on the CPU", file=sys.stderr, flush=True)
    device = device_of(dry_run)
    cpu = ZooRnnForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    here = ZooRnnForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, cpu.config.vocab_size, (4, 64))
    with torch.no_grad():
        error = (here(ids.to(device)).logits.cpu() - cpu(ids).logits).abs().max().item()
    limit = tolerance("vanilla" if dry_run else "cuda_fused", "float32")
    status = "pass" if error <= limit else "FAIL"
    check = "saved model: device logits vs CPU"
    yield row("product", check, f"{error:.2e}", "max |logit diff|", status=status, detail=f"tolerance {limit:g}")


def population(dry_run: bool):
    """The ES population as one batch (EGGROLL): 256 and 1,024 rank-1 members each continuing 8 prompts for 40 tokens
    in one batched forward per token (`members_generate`), against plain batched `generate` of the same rows; the
    torch backend (cuDNN's LSTM for the plain model), so nothing waits for a kernel build."""
    device = device_of(dry_run)
    config = ZooRnnConfig(
        vocab_size=4096,
        embedding_size=256,
        num_heads=2,
        head_dim=256,
        num_hidden_layers=2,
        backend="torch",
        eos_token_id=None,
        pad_token_id=0,
    )
    model = ZooRnnForCausalLM(config).to(device).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    prompts, tokens = 8, 4 if dry_run else 40
    ids = torch.randint(1, config.vocab_size, (prompts, 6), device=device)
    for members in (4,) if dry_run else (256, 1024):
        zo = ZOOptimizer(model, ZOConfig(num_probes=members // 2, lr=1e-3, perturbation="lowrank"))
        changes = dict(zip(zo.names, zo.perturber.members(range(members // 2), (1e-3, -1e-3)), strict=True))
        batched = partial(
            members_generate, model, changes, ids, attention_mask=None, max_new_tokens=tokens, pad_token_id=0
        )
        rows = ids.repeat(members, 1)
        plain = partial(
            model.generate, rows, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
        )
        results = {}
        for name, fn in (("plain generate", plain), ("ES members, one batch", batched)):
            with torch.no_grad():
                fn()  # warm-up
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, _ = timed(fn, device)
            results[name] = members * prompts / seconds
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            check = f"{name}, {members} members x {prompts} prompts"
            detail = f"{tokens} tokens; peak {peak:.0f} MiB"
            yield row("population", check, round(results[name]), "completions/s", detail=detail)
        share = results["ES members, one batch"] / results["plain generate"]
        check = f"ES batch / plain generate, {members} members"
        if dry_run:
            status, detail = "n/a", "toy sizes on the CPU: no target"
        else:
            status, detail = "pass" if share >= 0.85 else "below target", "target >= 0.85 (issue 27)"
        yield row("population", check, round(share, 3), "ratio", status=status, detail=detail)


# -- the driver ---------------------------------------------------------------------------------------------------


def run_part(part: str, args: GpuCheckArguments, output_dir: Path) -> list[dict]:
    command = [sys.executable, __file__, "--worker", part, "--output_dir", str(output_dir)]
    if args.dry_run:
        command.append("--dry_run")
    limit = PART_SECONDS[part] * args.part_seconds
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )  # its own process group: a time-out ends its children too
    try:
        stdout, stderr = process.communicate(timeout=limit)
        ended = f"exit {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        ended = f"stopped at its {limit:.0f} s limit"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    with open(output_dir / "workers.log", "a") as log:  # the workers' own output: compiler errors, tracebacks
        log.write(f"===== {part}: {ended}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    if ended != "exit 0":
        last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        seconds = round(time.perf_counter() - started, 1)
        rows.append(row(part, "(part)", seconds, "s", status="incomplete", detail=f"{ended}; {last_line}"[:300]))
    return rows


def write_report(rows: list[dict], env: dict, output_dir: Path) -> None:
    with open(output_dir / "gpu_check.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row("", "", "", "")))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["**Environment:** " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for part in dict.fromkeys(r["part"] for r in rows):
        lines += [f"#### {part}", "", "| check | value | unit | status | detail |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['check']} | {r['value']} | {r['unit']} | {r['status']} | {r['detail']} |"
            for r in rows
            if r["part"] == part
        ]
        lines.append("")
    (output_dir / "gpu_check.md").write_text("\n".join(lines))


def main() -> None:
    (args,) = HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        torch.manual_seed(0)
        for result in globals()[args.worker](args.dry_run):
            print(json.dumps(result), flush=True)
        return
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_check.py: unknown part(s) {unknown}; choose from {PARTS}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; --dry_run checks the plumbing on CPU")
    env = environment()
    (output_dir / "workers.log").unlink(missing_ok=True)
    rows = []
    for part in args.parts:
        rows += run_part(part, args, output_dir)
        lines = [
            f"{r['part']:>10} | {r['check']} | {r['value']} {r['unit']} | {r['status']} | {r['detail']}"
            for r in rows
            if r["part"] == part
        ]
        print("\n".join(lines), flush=True)
    write_report(rows, env, output_dir)
    print(f"wrote {output_dir / 'gpu_check.csv'} and {output_dir / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
