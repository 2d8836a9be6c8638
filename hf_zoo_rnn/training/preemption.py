"""SIGTERM and SIGINT end a run the way cluster schedulers expect: the current step finishes, a checkpoint is saved,
and the process exits non-zero (128 + the signal's number) with one line saying where to resume from.

Every launcher the project ships delivers the signal to the trainer: torch elastic and accelerate's single-process
launcher forward it, and the trainer also asks the kernel to send it SIGTERM if its parent dies first (a launcher that
does not forward, or is killed outright), so it is never left running alone. With several processes they agree on the
step to stop at (one all-reduced flag per step), so every process saves the same checkpoint. A second signal stops at
once, as without the handler.
"""

import ctypes
import signal
import sys
import threading

import torch

from ..rewards import RewardCall, RewardInterrupted

PR_SET_PDEATHSIG = 1  # linux/prctl.h
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def parent_death_signal(signum: int) -> None:
    """Linux: have the kernel send `signum` to this process when its parent ends (0: nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


class Preempted(Exception):
    """The run was asked to stop by a signal and saved a checkpoint: exit with 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """Records SIGTERM / SIGINT instead of dying mid-step; `requested` says whether to stop after this step. With
    `interrupt_rewards` (one process: no other waits on it) a signal that arrives while a reward function runs
    abandons the step at once (RewardInterrupted), so a slow reward cannot outlast a scheduler's grace period."""

    def __init__(self, interrupt_rewards: bool = False):
        self.signum = 0
        self.previous = {}
        self.interrupt_rewards = interrupt_rewards

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
            return
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self.record)
        parent_death_signal(signal.SIGTERM)  # our parent, the launcher, dying is a request to stop too

    def uninstall(self) -> None:
        if self.previous:
            parent_death_signal(0)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def record(self, signum: int, frame) -> None:
        if self.signum:  # asked twice: stop now, as the signal would without us
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.interrupt_rewards and RewardCall.active and RewardCall.interruptible:
            raise RewardInterrupted(signum)

    def requested(self, accelerator) -> int:
        """The signal to stop for, the same on every process (0 for none)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())
