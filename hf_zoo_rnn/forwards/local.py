"""Local-gradient views: the parts of the gradient that need no backpropagation through time.

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
from functools import partial

import torch
import torch.nn.functional as F

from ..modeling_zoo_rnn import IGNORE_INDEX, ZooRnnForCausalLM, ZooRnnLayer, run_recurrence
from .next_token import next_token_losses

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
        losses, _ = next_token_losses(logits, labels, start, end, "sum" if row_weights is None else "none")
        yield losses if row_weights is None else (losses.view(logits.shape[:2]) * row_weights[:, None]).sum()


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
