"""Two machines without a shared filesystem, simulated on one host: each `accelerate launch --num_machines 2`
runs in its own mount namespace where the output path is its own folder, as two cloud machines' local disks are.
Also: a mistake under accelerate launch is one line, and the root cause of torch elastic's report."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import FAST_TRAINING
from safetensors.torch import load_file

from hf_zoo_rnn.training import ZooTrainer, parse_arguments

ARGS = [*FAST_TRAINING, "--max_steps", "30", "--save_steps", "2", "--save_total_limit", "3"]
ARGS += ["--eval_steps", "0", "--log_with", "none"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*options: str) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    settings = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*accelerate, *settings, *options, "-m", "hf_zoo_rnn.train"]


def start_machines(tmp_path, extra: list[str]) -> list[subprocess.Popen]:
    """Machine r sees tmp_path/machine<r> at tmp_path/run (a bind mount in its own mount namespace)."""
    run, port = tmp_path / "run", free_port()
    run.mkdir(exist_ok=True)
    main_process = ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    machines = []
    for rank in range(2):
        disk = tmp_path / f"machine{rank}"
        disk.mkdir(exist_ok=True)
        command = launch("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), *main_process)
        bind_disk_at_run = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", bind_disk_at_run]
        namespace += ["sh", str(disk), str(run)]
        argv = [*namespace, *command, "--output_dir", str(run), *ARGS, *extra]
        machines.append(
            subprocess.Popen(
                argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        )
    return machines


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torch elastic starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(parents.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(machines: list[subprocess.Popen]) -> None:
    for machine in machines:
        _, stderr = machine.communicate(timeout=600)
        assert machine.returncode == 0, stderr[-3000:]


@pytest.mark.skipif(not can_unshare(), reason="needs unshare with user and mount namespaces")
def test_machines_with_their_own_disks_save_kill_and_resume_bitwise(tmp_path):
    machines = start_machines(tmp_path, [])
    disks = [tmp_path / "machine0", tmp_path / "machine1"]
    deadline = time.time() + 300
    while not all((disk / "checkpoint-4").is_dir() for disk in disks) and time.time() < deadline:
        assert all(machine.poll() is None for machine in machines), machines[0].communicate()[1][-3000:]
        time.sleep(0.02)
    for machine in machines:
        kill_tree(machine.pid)
        machine.wait()
    assert not any((disk / "model.safetensors").exists() for disk in disks), "the run ended before it was killed"
    for rank, disk in enumerate(disks):  # each machine holds whole checkpoints, with only its own process's state
        checkpoint = disk / "checkpoint-4"
        assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.safetensors").is_file()
        assert [p.name for p in checkpoint.glob("process_*.json")] == [f"process_{rank}.json"]
    newest = max(int(p.name.split("-")[1]) for p in disks[0].glob("checkpoint-*"))
    (disks[1] / f"checkpoint-{newest}" / "optimizer.safetensors").write_bytes(b"damaged on machine 1 only")

    finish(start_machines(tmp_path, ["--resume_from_checkpoint", "latest"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)  # the same arithmetic as each launched process
    try:
        ZooTrainer(*parse_arguments(["--output_dir", str(tmp_path / "whole"), *ARGS])).train()
    finally:
        torch.set_num_threads(2)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    for disk in disks:
        resumed = load_file(disk / "model.safetensors")
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), disk
    assert not list(tmp_path.glob("machine*/.tmp-*")) and not list(tmp_path.glob("machine*/.storage-check-*"))


def test_an_odd_probe_count_on_two_processes_is_the_root_cause_of_the_launch_failure(tmp_path):
    command = [*launch("--num_processes", "2", "--num_machines", "1"), "--output_dir", str(tmp_path), *ARGS]
    command += ["--zo_num_probes", "3", "--max_steps", "1"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    message = "train.py: error: zo_num_probes=3 is not divisible by the 2 processes"
    assert result.returncode != 0
    root_cause = result.stderr[result.stderr.index("Root Cause") :]
    assert f"traceback : {message}" in root_cause, result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") == 1  # the launcher's own; none from a process
