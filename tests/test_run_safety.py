"""A run on a shared cluster: preemption, a second writer, a full disk. SIGTERM / SIGINT to the launcher saves a
checkpoint and exits 128 + signal with one line, nothing is left running, and the run resumed after each of several
stops ends bitwise equal to an uninterrupted one. A second run into a folder in use, or into a finished run's
folder, is refused in one line. A disk that fills up is one line naming it, and loses no checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import FAST_TRAINING, ROOT
from safetensors.torch import load_file
from test_machines import can_unshare

from hf_zoo_rnn.data import documents, open_text_source

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
LAUNCH += ["--config_file", str(ROOT / "configs/accelerate/cpu-1.yaml"), str(ROOT / "scripts" / "train.py")]


def text_file(folder) -> str:
    path = folder / "books.txt"
    path.write_text("\n\n".join(book[:60_000] for book in list(documents(open_text_source("kjv", "train")))[:4]))
    return str(path)


def logged_steps(output_dir) -> list[int]:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [json.loads(line) for line in lines if line.endswith("}")]
    return [record["step"] for record in records if "train_loss" in record]


def trainers_running(output_dir) -> list[psutil.Process]:
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if str(output_dir) in " ".join(process.info["cmdline"] or []):
            mine.append(process)
    return mine


def test_sigterm_saves_exits_and_several_stops_resume_bitwise(tmp_path):
    args = [*FAST_TRAINING, "--dataset", text_file(tmp_path), "--max_steps", "400", "--save_steps", "100"]
    args += ["--eval_steps", "0", "--log_with", "none", "--save_total_limit", "2"]
    subprocess.run([*LAUNCH, "--output_dir", str(tmp_path / "whole"), *args], check=True, env=ENV, capture_output=True)
    out, rng, resume, stops = tmp_path / "stopped", random.Random(0), [], []
    for target in sorted(rng.sample(range(3, 350), 3)):
        command = [*LAUNCH, "--output_dir", str(out), *args, *resume]
        launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while (max(logged_steps(out), default=0) < target) and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.01)
        signalled = time.perf_counter()
        launcher.send_signal(signal.SIGTERM)
        stderr = launcher.communicate(timeout=60)[1]
        stops.append(time.perf_counter() - signalled)
        assert launcher.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        last = stderr.strip().splitlines()[-1]
        assert "train.py: stopped by SIGTERM after step" in last and "--resume_from_checkpoint latest" in last, last
        step = int(last.split("after step ")[1].split(":")[0])
        assert step >= target and (out / f"checkpoint-{step}").is_dir()
        assert "Traceback" not in stderr
        assert not trainers_running(out), "a process of the stopped run is still running"
        resume = ["--resume_from_checkpoint", "latest"]
    subprocess.run([*LAUNCH, "--output_dir", str(out), *args, *resume], check=True, env=ENV, capture_output=True)
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert logged_steps(out) == logged_steps(tmp_path / "whole")
    print(f"SIGTERM to exit: {', '.join(f'{s:.2f} s' for s in stops)}")


def test_a_second_run_and_a_finished_runs_folder_are_refused(tmp_path):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--max_steps", "100000", "--save_steps", "0", "--eval_steps", "0", "--log_with", "none"]
    command = [sys.executable, "-m", "hf_zoo_rnn.train", "--output_dir", str(out), *args]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not logged_steps(out) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*command, "--resume_from_checkpoint", "latest"], env=ENV, capture_output=True, text=True)
    assert second.returncode != 0
    assert (
        second.stderr.strip().splitlines()[-1].startswith("train.py: error: ")
        or "is in use by another run" in second.stderr
    )
    assert f"{out} is in use by another run" in second.stderr.strip().splitlines()[-1]
    assert f'"pid": {first.pid}' in second.stderr
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 128 + signal.SIGINT
    # the first run stopped with a checkpoint; a new run into its folder is refused, overwrite starts over
    into_the_stopped_run = [*command[:3], "--output_dir", str(out), *args[:-6], "--max_steps", "2"]
    fresh = subprocess.run(into_the_stopped_run, env=ENV, capture_output=True, text=True)
    assert fresh.returncode != 0
    last = fresh.stderr.strip().splitlines()[-1]
    assert "error:" in last and "holds a previous run (checkpoint-" in last and "--overwrite_output_dir" in last
    assert "Traceback" not in fresh.stderr
    again = [*command[:3], "--output_dir", str(out), *FAST_TRAINING, "--max_steps", "2", "--save_steps", "0"]
    again += ["--eval_steps", "0", "--log_with", "none", "--overwrite_output_dir"]
    subprocess.run(again, env=ENV, check=True, capture_output=True)
    assert logged_steps(out) == [1, 2] and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


@pytest.mark.parametrize("changed", [["--seed", "7"], ["--estimator", "bptt"]])
def test_resuming_another_runs_checkpoint_is_refused(tmp_path, changed):
    out = tmp_path / "run"
    args = [*FAST_TRAINING, "--max_steps", "2", "--eval_steps", "0", "--log_with", "none"]
    train = [sys.executable, "-m", "hf_zoo_rnn.train", "--output_dir", str(out), *args]
    subprocess.run(train, env=ENV, check=True, capture_output=True)
    resume = [*train, "--max_steps", "4", "--resume_from_checkpoint", "latest", *changed]
    result = subprocess.run(resume, env=ENV, capture_output=True, text=True)
    assert result.returncode != 0
    assert "was trained by another run than this run asks for" in result.stderr and changed[0][2:] in result.stderr


@pytest.mark.skipif(not can_unshare(), reason="needs unshare (user and mount namespaces) for a small private disk")
def test_a_full_disk_is_one_line_and_loses_no_checkpoint(tmp_path):
    """A 2 MB tmpfs, private to the run's mount namespace, fills up while checkpoints accumulate: the run ends with
    one line naming the cause, leaves no staging folder, and resumes from its newest checkpoint once there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    train = [sys.executable, "-m", "hf_zoo_rnn.train", "--output_dir", str(run), *FAST_TRAINING, "--tokenizer", "char"]
    train += ["--eval_steps", "0", "--log_with", "none", "--save_steps", "1", "--save_total_limit", "0"]
    verify = "from hf_zoo_rnn.training.checkpoints import latest_checkpoint as l; import sys; print('LATEST', l(sys.argv[1]))"
    script = f"""
mount -t tmpfs -o size=2m tmpfs {disk} || exit 99
{" ".join(train)} --max_steps 100000 2> {tmp_path}/stderr
echo "EXIT $?"
ls -a {run}
{sys.executable} -c "from pathlib import Path; {verify.replace("l(sys.argv[1])", f"l(Path('{run}'))")}"
latest=$(ls -d {run}/checkpoint-* | sort -t- -k2 -n | tail -1)
for old in {run}/checkpoint-*; do [ "$old" = "$latest" ] || rm -rf "$old"; done
{" ".join(train)} --resume_from_checkpoint latest --max_steps $(( ${{latest##*-}} + 2 )) 2> {tmp_path}/resume
echo "RESUMED $?"
"""
    in_a_mount_namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    result = subprocess.run(in_a_mount_namespace, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    stderr = (tmp_path / "stderr").read_text()
    assert "EXIT 1" in result.stdout and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "error:" in last and "No space left on device" in last, last
    assert ".tmp-" not in result.stdout, result.stdout  # no staging folder keeps the space
    assert "LATEST None" not in result.stdout and "LATEST " in result.stdout  # the newest checkpoint verifies
    assert "RESUMED 0" in result.stdout, (tmp_path / "resume").read_text()[-3000:]
