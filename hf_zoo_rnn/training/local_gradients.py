"""Exact local gradients: the parts of the gradient that need no backpropagation through time.

Two scopes, both computed chunk by chunk over the context with a backward per chunk, so memory is one chunk
whatever the context length, and both yielding the clean loss L(theta) of the same forward:

* ``readout``: the readout (lm_head weight and bias, and the final norm when present) by its exact gradient.
  At each position the loss depends on the readout only through that position's hidden state, so with the
  hidden states detached this *is* the full-context gradient of those parameters.
* ``one_step``: every parameter by its one-step gradient: each position's loss differentiated through the
  layers at that position and one recurrent step, the incoming recurrent state treated as a constant. For the
  readout this equals the exact gradient; for the recurrence it is a biased surrogate (credit that flows through
  the state to earlier steps is cut). Every position's step runs in parallel: no loop over time with a graph.
"""

import contextlib
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import partial

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from ..modeling_zoo_rnn import IGNORE_INDEX, ZooRnnForCausalLM, ZooRnnLayer, run_recurrence, shifted_targets

SCOPES = ("readout", "one_step")


def readout_parameter_names(model: ZooRnnForCausalLM) -> list[str]:
    """The parameters after the last recurrent layer: the final norm (if any) and the readout."""
    return [name for name, _ in model.named_parameters() if name.startswith(("lm_head.", "model.norm_f."))]


def chunk_losses(
    model: ZooRnnForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    scope: str,
    row_weights: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Per time chunk, the summed next-token loss with a graph through the scope's parameters only; `row_weights`
    [B] weighs each sequence's terms (a policy gradient's advantages)."""
    if scope not in SCOPES:
        raise ValueError(f"local gradient scope must be one of {SCOPES}, got {scope!r}")
    config = model.config
    state = list(model.initial_state(input_ids.shape[0]))
    for start in range(0, input_ids.shape[1], config.chunk_size):  # chunks as the model's own forward walks them
        end = min(start + config.chunk_size, input_ids.shape[1])
        with torch.no_grad() if scope == "readout" else contextlib.nullcontext():
            hidden = model.model.embeddings(input_ids[:, start:end])
            for i, layer in enumerate(model.model.layers):
                hidden, state[i] = (layer if scope == "readout" else partial(one_step_layer, layer))(hidden, state[i])
        if model.model.norm_f is not None:
            hidden = model.model.norm_f(hidden)
        logits = model.lm_head(hidden)
        targets = shifted_targets(labels, start, end)
        losses = F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum" if row_weights is None else "none",
        )
        yield losses if row_weights is None else (losses.view(targets.shape) * row_weights[:, None]).sum()


def one_step_layer(layer: ZooRnnLayer, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's outputs over a chunk with a graph through one recurrent step per position, and its (detached)
    last state. x [B, T, in] may carry a graph (from the layers below at the same positions)."""
    batch, steps, _ = x.shape
    normed = layer.norm(x) if layer.norm is not None else x
    with torch.no_grad():  # the clean recurrence, on whichever backend: the states each position starts from
        h_all, last = layer.recur(
            run_recurrence, normed.detach(), layer.input_proj.weight, layer.recurrent_kernel, layer.bias, state
        )
    h_prev = torch.cat((state[0][:, None], h_all[:, :-1]), dim=1)  # [B, T, N, D]
    wx = F.linear(normed, layer.input_proj.weight).view(batch, steps, -1, layer.num_heads, layer.head_dim)
    recurrent = torch.einsum("btnd,gnod->btgno", h_prev, layer.recurrent_kernel)  # [B, T, G, N, D]
    if layer.cell == "lstm":
        gates = wx + recurrent + layer.bias
        i, f, o = torch.sigmoid(gates[:, :, 0]), torch.sigmoid(gates[:, :, 1]), torch.sigmoid(gates[:, :, 3])
        z = torch.tanh(gates[:, :, 2])
        c_prev = cell_states_before(f.detach(), (i * z).detach(), state[1])
        h = o * torch.tanh(torch.addcmul(i * z, f, c_prev))
    else:
        b_hn, b_r, b_z, b_in = layer.bias
        reset = torch.sigmoid(wx[:, :, 0] + recurrent[:, :, 1] + b_r)
        update = torch.sigmoid(wx[:, :, 1] + recurrent[:, :, 2] + b_z)
        candidate = torch.tanh(wx[:, :, 2] + b_in + reset * (recurrent[:, :, 0] + b_hn))
        h = torch.lerp(candidate, h_prev, update)
    out = h.reshape(batch, steps, -1)
    return (out + x if layer.residual else out), last


@torch.no_grad()
def cell_states_before(forget: torch.Tensor, written: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """LSTM cell states entering each position: c_t = f_t c_{t-1} + (i z)_t, an elementwise scan [B, T, N, D]."""
    states, c = [], c0
    for t in range(forget.shape[1]):
        states.append(c)
        c = torch.addcmul(written[:, t], forget[:, t], c)
    return torch.stack(states, dim=1)


def accumulate_local_gradients(
    model: ZooRnnForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    scope: str,
    row_weights: torch.Tensor | None = None,
) -> float:
    """Add the scope's gradient of the mean loss into `.grad` of the parameters that require grad (one backward
    per chunk); returns the mean loss of this forward (the clean loss at the current parameters). With
    `row_weights` the loss is the mean of each sequence's terms times its weight (minus a policy gradient's
    objective when the weights are advantages)."""
    count = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    total = 0.0
    for loss_sum in chunk_losses(model, input_ids, labels, scope, row_weights):
        if loss_sum.requires_grad:
            (loss_sum / count).backward()
        total += loss_sum.item()
    return total / count


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
