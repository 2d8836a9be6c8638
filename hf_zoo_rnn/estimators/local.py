"""The local-gradient estimator's optimiser half: which parameters each estimator trains, and the AdamW step on the
exact local gradient (hf_zoo_rnn/forwards/local.py computes it, chunk by chunk, without backpropagation through
time)."""

from fnmatch import fnmatch

import torch
from transformers import get_scheduler

from ..forwards.local import accumulate_local_gradients, readout_parameter_names
from ..modeling_zoo_rnn import ZooRnnForCausalLM
from .step import StepReport, check_state_kind


def partition_parameters(
    model: ZooRnnForCausalLM, local_gradient: str, zo_patterns: str
) -> tuple[list[str], list[str]]:
    """(names trained by ZO, names trained by the local gradient), in registration order; the rest stays frozen.

    zo_patterns "auto" gives ZO every parameter the local gradient does not train: all of them without one, all
    but the readout with "readout", none with "one_step" (which trains everything). Globs move the named
    parameters to ZO. A tied embedding is refused by "readout": the tied matrix is also the input embedding,
    whose gradient needs more than the readout ("one_step" covers both roles, as both act within one step).
    """
    names = [name for name, _ in model.named_parameters()]
    readout = readout_parameter_names(model)
    if local_gradient == "readout" and model.config.tie_word_embeddings:
        raise ValueError(
            "local_gradient=readout cannot train a tied readout (tie_word_embeddings): the tied matrix is also the "
            "input embedding; untie it or use local_gradient=one_step"
        )
    if zo_patterns == "auto":
        zo = [] if local_gradient == "one_step" else [n for n in names if local_gradient == "none" or n not in readout]
    else:
        globs = [glob.strip() for glob in zo_patterns.split(",") if glob.strip()]
        unmatched = [glob for glob in globs if not any(fnmatch(name, glob) for name in names)]
        if unmatched or not globs:
            raise ValueError(f"zo_parameters {zo_patterns!r}: {unmatched or 'no glob'} matches none of {names}")
        zo = [name for name in names if any(fnmatch(name, glob) for glob in globs)]
    if local_gradient == "none":
        return zo, []
    scope = readout if local_gradient == "readout" else names
    return zo, [name for name in scope if name not in zo]


class LocalGradientStep:
    """The first-order half of a hybrid step: the scope's exact local gradient of `trained` (plus, unstepped,
    of `surrogate` for guided probes), averaged over processes by `reduce` when each has its own batch, and
    stepped by AdamW (decay on matrices only) under a transformers schedule."""

    def __init__(
        self,
        model: ZooRnnForCausalLM,
        scope: str,
        trained: list[str],
        surrogate: list[str],
        args,
        total_steps: int,
        reduce=None,
    ):
        self.model, self.scope, self.reduce = model, scope, reduce
        params = dict(model.named_parameters())
        self.trained = [params[name] for name in trained]
        self.surrogate = [params[name] for name in surrogate]
        model.requires_grad_(False)
        for param in self.trained + self.surrogate:
            param.requires_grad_(True)
        self.optimizer, self.scheduler = None, None
        if self.trained:
            groups = [
                {"params": [p for p in self.trained if p.ndim >= 2], "weight_decay": args.local_weight_decay},
                {"params": [p for p in self.trained if p.ndim < 2], "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.AdamW(
                [group for group in groups if group["params"]],
                lr=args.local_lr,
                betas=(args.local_beta1, args.local_beta2),
            )
            self.scheduler = get_scheduler(
                args.local_lr_schedule, self.optimizer, args.local_warmup_steps, total_steps * args.local_steps
            )

    def gradients(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """Fill .grad with this batch's local gradient (process mean); returns the clean loss of this process's
        batch and the bytes this process sent to average the gradient."""
        self.drop_gradients()
        loss = accumulate_local_gradients(self.model, input_ids, labels, self.scope)
        if self.reduce is None:
            return loss, 0
        grads = [param.grad for param in self.trained + self.surrogate]
        flat = self.reduce(torch.cat([g.reshape(-1) for g in grads]))
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(piece.view_as(grad))
        return loss, flat.numel() * flat.element_size()

    def surrogates(self) -> list[list[torch.Tensor]]:
        """The guide direction for the ZO parameters: their local gradient (one surrogate), or none."""
        return [[param.grad.detach().clone() for param in self.surrogate]] if self.surrogate else []

    def step(self) -> float | None:
        """One AdamW step on the trained parameters; returns the learning rate it used. A non-finite gradient is
        dropped instead (it would poison AdamW's moments) and None returned; after averaging the gradient is the
        same on every process, and so is that decision."""
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.trained + self.surrogate if p.grad is not None)
        lr = None
        if finite:
            lr = 0.0
            if self.optimizer is not None:
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
        self.drop_gradients()
        return lr

    def drop_gradients(self) -> None:
        for param in self.trained + self.surrogate:
            param.grad = None

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


class LocalStep:
    """Exact local gradients alone (the default: one_step trains every parameter): this batch's gradient and
    AdamW step, then local_steps - 1 more on fresh batches. A non-finite gradient is dropped (the step is skipped)."""

    train_label = "train (clean loss of each step's batch)"
    probes = 0

    def __init__(self, gradient: LocalGradientStep, next_batch, local_steps: int, accelerator, batch_copies: int):
        self.gradient, self.next_batch, self.local_steps = gradient, next_batch, local_steps
        self.accelerator, self.batch_copies = accelerator, batch_copies

    def step(self, batch) -> StepReport:
        clean_loss, report = self.gradients(batch)
        return self.finish(clean_loss, report, probes_skipped=True)

    def gradients(self, batch) -> tuple[float, StepReport]:
        """Fill .grad with the batch's local gradient; (its clean loss, what it cost)."""
        input_ids, labels = batch
        clean_loss, sent = self.gradient.gradients(input_ids, labels)
        return clean_loss, StepReport(forward_passes=1, tokens=input_ids.numel() * self.batch_copies, comm_bytes=sent)

    def finish(self, clean_loss: float, report: StepReport, probes_skipped: bool) -> StepReport:
        """The AdamW step on this batch's gradient and the further local steps; train_loss is this batch's clean
        loss, before the updates. A dropped gradient skips the step when the probes (if any) skipped theirs too."""
        local_lr = self.gradient.step()
        if local_lr is None:
            report.metrics["skipped_step"] = int(probes_skipped)
        else:
            report.metrics["local_lr"] = local_lr
        for _ in range(self.local_steps - 1):
            extra_ids, extra_labels = self.next_batch()
            _, sent = self.gradient.gradients(extra_ids, extra_labels)
            self.gradient.step()
            report.add(StepReport(forward_passes=1, tokens=extra_ids.numel() * self.batch_copies, comm_bytes=sent))
        if self.batch_copies > 1:  # each process has its own batch: log the mean over processes, as BPTT does
            device = self.accelerator.device
            clean_loss = self.accelerator.reduce(torch.tensor(clean_loss, device=device), "mean").item()
        report.metrics["train_loss"] = clean_loss
        return report

    def state_dict(self) -> dict:
        return {"local": self.gradient.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(state, local=True, probes=False)
        self.gradient.load_state_dict(state["local"])
