"""PyTorch ZooRnn: a multi-head LSTM/GRU causal language model whose recurrence runs on FlashRNN.

Parameters are stored in FlashRNN's layout whatever the backend, so one checkpoint runs on FlashRNN's CUDA kernels
and on this file's CPU loop alike:

    input projection  Linear(in, G_in * N * D)  output viewed as Wx [B, T, G_in, N, D]
    recurrent kernel  R [G_r, N, D_out, D_in]     block-diagonal: head n only sees its own D units
    bias              b [G_b, N, D]
    state             [S, B, N, D] per layer      (LSTM: S = 2, h and c; GRU: S = 1)

LSTM gates are (i, f, z, o) everywhere. GRU: Wx gates (r, z, n), R gates (n, r, z), b = (b_hn, b_r, b_z, b_in),
exactly FlashRNN's convention. This file is also shipped as Hub remote code: it imports nothing from the rest of
hf_zoo_rnn, and flashrnn is optional.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_zoo_rnn import ZooRnnConfig

try:  # optional: the model runs on its own torch loop without it
    from flashrnn import flashrnn as flashrnn_kernel
except ImportError:
    flashrnn_kernel = None


# cell -> (input gates, recurrent gates, bias rows, states)
CELL_SHAPES = {"lstm": (4, 4, 4, 2), "gru": (3, 3, 4, 1)}
FLASHRNN_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
IGNORE_INDEX = -100
EMPTY_INPUT = (
    "ZooRnn needs at least one input token, got none (an empty prompt? start it with the tokenizer's bos_token)"
)


# Recurrence. Three ways to run the same cell on the same parameters:
#   * FlashRNN kernels (CUDA; `vanilla` anywhere),
#   * ATen's fused LSTM/GRU (oneDNN on CPU) with the block-diagonal R expanded to a dense matrix: fastest for a
#     few heads, where the expansion costs little,
#   * a head-major loop with one batched matmul per step: for many heads, where a dense R would waste N-fold work.
# ---------------------------------------------------------------------------------------------------------------------

# Measured on 2 CPU cores (docs/BENCHMARKS.md): expanding R to dense costs num_heads-fold work, which is cheap while
# the layer is small (overhead-bound) and 2-3x slower than the head loop at hidden 1600 with 4+ heads.
DENSE_MAX_HIDDEN = 512


def cpu_path(num_heads: int, hidden_size: int) -> str:
    """Which torch implementation runs a layer: the fused ATen kernel ('dense') or the head-major 'loop'."""
    return "dense" if num_heads == 1 or hidden_size <= DENSE_MAX_HIDDEN else "loop"


def block_diagonal(R: torch.Tensor) -> torch.Tensor:
    """[G, N, D_out, D_in] -> dense [G * N * D_out, N * D_in], the layout of nn.LSTM/nn.GRU's weight_hh."""
    gates, heads, dim, _ = R.shape
    if heads == 1:
        return R.reshape(gates * dim, dim)
    return torch.stack([torch.block_diag(*R[g]) for g in range(gates)]).reshape(gates * heads * dim, heads * dim)


def lstm_dense(x, W, R, b, state):
    """LSTM through ATen's fused kernel. x [B,T,E], W [4*H,E], R [4,N,D,D], b [4,N,D], state [2,B,N,D]."""
    batch, heads, dim = state.shape[1:]
    h0, c0 = state.reshape(2, 1, batch, heads * dim)
    out, h, c = torch._VF.lstm(
        x,
        (h0, c0),
        [W, block_diagonal(R), b.reshape(-1), torch.zeros_like(b.reshape(-1))],
        True,
        1,
        0.0,
        False,
        False,
        True,
    )  # biases, layers, dropout, train, bidir, batch_first
    return out.view(batch, -1, heads, dim), torch.stack((h, c)).view(2, batch, heads, dim)


def gru_dense(x, W, R, b, state):
    """GRU through ATen's fused kernel (torch's GRU is this cell with R gates (r, z, n) and b_hn inside r * (.))."""
    batch, heads, dim = state.shape[1:]
    b_hn, b_r, b_z, b_in = b.reshape(4, -1)
    zeros = torch.zeros_like(b_hn)
    weights = [W, block_diagonal(R[[1, 2, 0]]), torch.cat((b_r, b_z, b_in)), torch.cat((zeros, zeros, b_hn))]
    out, h = torch._VF.gru(x, state.reshape(1, batch, heads * dim), weights, True, 1, 0.0, False, False, True)
    return out.view(batch, -1, heads, dim), h.view(1, batch, heads, dim)


def lstm_loop(x, W, R, b, state):
    """LSTM as a head-major loop. Shapes as `lstm_dense`; returns (h of every step [B,T,N,D], state [2,B,N,D])."""
    batch, steps, _ = x.shape
    return lstm_steps(F.linear(x, W).view(batch, steps, 4, *b.shape[1:]), R, b, state)


def lstm_steps(wx, R, b, state):
    """The LSTM loop on projected inputs. wx [B, T, 4, *H, D], R [4, *H, D, D], b [4, *H, D], state [2, B, *H, D],
    where the head dims *H are (N,) for one model and (P, N) for P stacked models.

    Each gate is one batched matmul per step against a transposed *view* of R, and the inputs are read through
    views: nothing weight- or input-sized is re-laid out, which matters when R holds a billion parameters."""
    xb = wx + b  # bias folded in once; still [B, T, 4, *H, D]
    r = R.transpose(-1, -2)  # [4, *H, D_in, D_out], a view
    # [*H, B, D], contiguous: elementwise results inherit their inputs' layout, and matmul wants this one
    h, c = state[0].movedim(0, -2).contiguous(), state[1].movedim(0, -2).contiguous()
    outputs = []
    for t in range(wx.shape[1]):
        x = xb[:, t].movedim(0, -2)  # [4, *H, B, D], a view
        i = torch.sigmoid(torch.matmul(h, r[0]).add_(x[0]))
        f = torch.sigmoid(torch.matmul(h, r[1]).add_(x[1]))
        z = torch.tanh(torch.matmul(h, r[2]).add_(x[2]))
        o = torch.sigmoid(torch.matmul(h, r[3]).add_(x[3]))
        c = torch.addcmul(f * c, i, z)
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs).movedim(-2, 0), torch.stack((h, c)).movedim(-2, 1)


def gru_loop(x, W, R, b, state):
    """GRU as a head-major loop. Shapes as `gru_dense`."""
    batch, steps, _ = x.shape
    return gru_steps(F.linear(x, W).view(batch, steps, 3, *b.shape[1:]), R, b, state)


def gru_steps(wx, R, b, state):
    """The GRU loop on projected inputs, shapes as `lstm_steps` with 3 gates: h' = z * h + (1 - z) * tanh(x_n +
    b_in + r * (R_n h + b_hn)); wx gates (r, z, n), R gates (n, r, z)."""
    b_hn, b_r, b_z, b_in = b
    xb = wx + torch.stack((b_r, b_z, b_in))  # [B, T, 3, *H, D]
    r = R.transpose(-1, -2)  # [3, *H, D_in, D_out], a view
    b_hn = b_hn.unsqueeze(-2)  # [*H, 1, D]
    h = state[0].movedim(0, -2).contiguous()  # [*H, B, D], the layout matmul wants
    outputs = []
    for t in range(wx.shape[1]):
        x = xb[:, t].movedim(0, -2)  # [3, *H, B, D], a view
        reset = torch.sigmoid(torch.matmul(h, r[1]).add_(x[0]))
        update = torch.sigmoid(torch.matmul(h, r[2]).add_(x[1]))
        candidate = torch.tanh(torch.matmul(h, r[0]).add_(b_hn).mul_(reset).add_(x[2]))
        h = torch.lerp(candidate, h, update)
        outputs.append(h)
    return torch.stack(outputs).movedim(-2, 0), h.movedim(-2, 0)[None]


TORCH_CELLS = {
    ("lstm", "dense"): lstm_dense,
    ("gru", "dense"): gru_dense,
    ("lstm", "loop"): lstm_loop,
    ("gru", "loop"): gru_loop,
}
PROJECTED_CELLS = {"lstm": lstm_steps, "gru": gru_steps}


def resolve_backend(requested: str, cell: str, device: torch.device) -> str:
    """Turn the configured backend into the one to run; an explicit choice that cannot run fails clearly."""
    if requested == "auto":
        if device.type == "cuda" and flashrnn_kernel is not None:
            return "cuda_fused" if cell == "lstm" else "cuda"
        return "torch"
    if requested == "torch":
        return requested
    if flashrnn_kernel is None:
        raise ImportError(f"ZooRnnConfig.backend={requested!r} needs the flashrnn package: pip install flashrnn")
    if requested != "vanilla" and device.type != "cuda":
        raise ValueError(f"ZooRnnConfig.backend={requested!r} runs on CUDA only; the model is on {device}")
    if requested == "triton_fused" and cell != "lstm":
        raise ValueError(f"ZooRnnConfig.backend='triton_fused' supports cell='lstm' only, not {cell!r}")
    return requested


def run_recurrence(cell: str, backend: str, x, W, R, b, state):
    """One recurrent call over x [B,T,E]: (h of every step [B,T,N,D], last state [S,B,N,D])."""
    heads, dim = b.shape[1:]
    if backend == "torch" and cpu_path(heads, heads * dim) == "dense":
        return TORCH_CELLS[cell, "dense"](x, W, R, b, state)
    return run_projected(cell, backend, F.linear(x, W).view(*x.shape[:2], -1, heads, dim), R, b, state)


def run_projected(cell: str, backend: str, wx, R, b, state):
    """The recurrence on projected inputs wx [B, T, G, *H, D] (shapes as `lstm_steps`): the torch loop or a FlashRNN
    kernel, which sees the head dims *H flattened into one."""
    if backend == "torch":
        return PROJECTED_CELLS[cell](wx, R, b, state)
    batch, steps, gates, *heads, dim = wx.shape
    states_all, last = flashrnn_kernel(
        Wx=wx.reshape(batch, steps, gates, -1, dim),
        R=R.reshape(R.shape[0], -1, dim, dim),
        b=b.reshape(b.shape[0], -1, dim),
        states=state.reshape(state.shape[0], batch, 1, -1, dim),
        function=cell,
        backend=backend,
        dtype=FLASHRNN_DTYPES[wx.dtype],
    )
    return states_all[0].view(batch, steps, *heads, dim), last[:, :, 0].view(state.shape)


def stacked_linear(x, weight, bias=None):
    """P linear layers at once: x [P, ..., in], weight [P, out, in], bias [P, out] -> [P, ..., out]. One bmm over
    flattened rows (torch.matmul would broadcast, and so copy, the weight for every leading dimension)."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    out = (
        torch.bmm(rows, weight.transpose(1, 2))
        if bias is None
        else torch.baddbmm(bias[:, None], rows, weight.transpose(1, 2))
    )
    return out.view(*x.shape[:-1], weight.shape[1])


def stacked_layer_norm(x, weight, bias, eps: float):
    """LayerNorm of P models at once: x [P, ..., C], weight and bias [P, C]."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:], eps=eps), weight.view(shape))


def member_linear_change(x, change):
    """x [M, ..., n] through each member's change of a Linear weight: (x B_m) A_m^T for a low-rank change A_m B_m^T
    (nothing m x n is formed), x D_m^T for a dense one D [M, m, n]."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if change[0] == "dense":
        out = torch.bmm(rows, change[1].transpose(1, 2))
    else:
        out = torch.bmm(torch.bmm(rows, change[2]), change[1].transpose(1, 2))
    return out.view(*x.shape[:-1], out.shape[-1])


def member_lookup(change, ids: torch.Tensor) -> torch.Tensor:
    """Each member's change of the embedding rows `ids` [B, t] -> [M, B, t, E]: A[ids] B^T, or the dense rows."""
    if change[0] == "dense":
        return change[1][:, ids]
    _, a, b = change
    return torch.matmul(a[:, ids].flatten(1, 2), b.transpose(1, 2)).view(a.shape[0], *ids.shape, b.shape[1])


def member_values(base: torch.Tensor, change) -> torch.Tensor:
    """[M, *shape]: a dense parameter (a bias, a norm) of every member: base + its change, or base shared."""
    return base + change[1] if change is not None else base[None]


def member_recurrence(cell: str, xb, R, b_hn, state, change):
    """The recurrence of M members folded into the batch: xb [M, B, T, G, N, D] projected inputs with their
    biases, R [G, N, D, D] shared, b_hn [M, N, D] (GRU: the bias inside the reset product; None for LSTM),
    state [S, M, B, N, D]; `change` is the members' low-rank change of R,
    ("lowrank", A [M, G, N, D, r], B [M, G, N, D, r]) or None. Per step one matmul of the shared R (every gate,
    every member's rows; R dense where `cpu_path` makes the single-model forward dense too), plus (h B) A^T per
    member and head. Returns (h of every step [M, B, T, N, D], state)."""
    gates, heads, dim = R.shape[:3]
    members, batch = state.shape[1:3]
    dense = cpu_path(heads, heads * dim) == "dense"
    r_all = block_diagonal(R).T if dense else R.permute(1, 3, 0, 2).reshape(heads, dim, gates * dim)
    if change is not None:
        if change[0] != "lowrank":
            raise ValueError("members_loss takes the recurrent kernel's change as low-rank factors")
        rank = change[1].shape[-1]
        b_all = change[2].permute(0, 2, 3, 1, 4).reshape(members, heads, dim, gates * rank)  # [M, N, D_in, G r]
        a_all = change[1].permute(0, 2, 1, 4, 3)  # [M, N, G, r, D_out]

    def recurrent(h):  # h [M, B, N, D] -> every gate's R h, per member: [M, B, G, N, D]
        if dense:
            out = torch.matmul(h.reshape(members * batch, -1), r_all).view(members, batch, gates, heads, dim)
        else:
            rows = h.permute(2, 0, 1, 3).reshape(heads, members * batch, dim)
            out = torch.matmul(rows, r_all).view(heads, members, batch, gates, dim).permute(1, 2, 3, 0, 4)
        if change is not None:
            projected = torch.einsum("mbnd,mndk->mbnk", h, b_all).view(members, batch, heads, gates, rank)
            out = out + torch.einsum("mbngr,mngro->mbgno", projected, a_all)
        return out

    if cell == "lstm":
        h, c = state[0], state[1]
    else:
        b_hn = b_hn[:, None]  # [M, 1, N, D]
        h = state[0]
    outputs = []
    for x in xb.unbind(2):  # [M, B, G, N, D] per step
        pre = recurrent(h)
        if cell == "lstm":  # gates (i, f, z, o)
            pre = pre.add_(x)
            i, f, o = torch.sigmoid(pre[:, :, 0]), torch.sigmoid(pre[:, :, 1]), torch.sigmoid(pre[:, :, 3])
            c = torch.addcmul(f * c, i, torch.tanh(pre[:, :, 2]))
            h = o * torch.tanh(c)
        else:  # R gates (n, r, z), input gates (r, z, n)
            reset = torch.sigmoid(pre[:, :, 1] + x[:, :, 0])
            update = torch.sigmoid(pre[:, :, 2] + x[:, :, 1])
            h = torch.lerp(torch.tanh((pre[:, :, 0] + b_hn) * reset + x[:, :, 2]), h, update)
        outputs.append(h)
    return torch.stack(outputs, dim=2), (torch.stack((h, c)) if cell == "lstm" else h[None])


def by_layer(values: dict, num_layers: int) -> list[dict]:
    """Split a parameter-name -> value mapping into one mapping per layer, keyed by the name inside the layer."""
    layers = []
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        layers.append({k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)})
    return layers


def per_model_loss_sums(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each of M models' logits [M, B, t, V] against the shared targets [B, t], and the
    number of scored positions per model."""
    models = logits.shape[0]
    losses = F.cross_entropy(
        logits.to(dtype).flatten(0, 2),
        targets.expand(models, -1, -1).flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(models, -1).sum(1), int((targets != IGNORE_INDEX).sum())


def shifted_targets(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Next-token targets of positions [start, end): labels[start + 1 : end + 1]; the last position has none."""
    targets = labels[:, start + 1 : end + 1]
    if end == labels.shape[1]:
        targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    return targets


def padding_of(attention_mask: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """Left padding, the only kind a recurrence can honour exactly: per row the number of padded positions among
    the last `steps` inputs (the mask may also cover earlier, already processed ones, as generate sends it), or
    None when there are none. Any other mask (a zero after a one) is refused."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "ZooRnn honours left padding only (each row of attention_mask: zeros, then ones); this mask has a zero "
            "after a one. Pad on the left (tokenizer.padding_side = 'left') or pass unpadded inputs"
        )
    return (~mask[:, -steps:]).sum(1)


def unpadded_spans(padding: torch.Tensor | None, start: int, end: int):
    """Split positions [start, end) where a row's left padding ends: yields (from, to, rows still padded throughout
    [from, to), or None when none are). Their state must stay as it was: a padded row starts when its text does."""
    if padding is None or bool((padding <= start).all()):
        yield start, end, None
        return
    cuts = sorted({start, end, *(int(p) for p in padding if start < p < end)})
    for low, high in zip(cuts, cuts[1:], strict=False):
        padded = padding >= high
        yield low, high, padded if bool(padded.any()) else None


IGNORED_INPUTS = ("position_ids", "cache_position", "past_key_values")  # a recurrence has no positions and no kv cache


def check_extra_inputs(name: str, output_attentions: bool | None, extra: dict) -> None:
    """Accept what transformers passes to every model on purpose; refuse anything else instead of ignoring it."""
    if output_attentions:
        raise ValueError(f"{name} has no attention layers: output_attentions=True has nothing to return")
    unknown = sorted(key for key in extra if key not in IGNORED_INPUTS)
    if unknown:
        raise TypeError(f"{name}.forward got unexpected keyword argument(s) {unknown}")


# ---------------------------------------------------------------------------------------------------------------------
# Generation: the model carries its own state between steps
# ---------------------------------------------------------------------------------------------------------------------

# generate() passes every keyword it does not know through to prepare_inputs_for_generation untouched. The record of
# the recurrent state travels under this name, which no transformers release reads: whether the state survives a step
# never depends on a release's list of cache names.
GENERATION_RECORD = "recurrent_record"
GENERATION_ONLY_INPUTS = ("next_sequence_length", "is_first_iteration", "labels", "state", "cache")


class RecurrentGenerationRecord:
    """The state one `generate` call carries between steps, and what that state has read.

    A row's state is a function of its prompt (ids or embeddings, mask, starting state) and of the tokens generated
    after it. Beam search reorders rows between steps; each step the record matches every row to the row that read
    exactly its tokens from the same prompt, and a row it cannot match is recomputed from the start, never guessed.
    """

    def __init__(self):
        self.prompt_length = 0  # input_ids columns that belong to the prompt
        self.groups = None  # [B]: rows with equal prompt, mask and starting state share a group
        self.start_state = None  # the state before the prompt; None for zeros
        self.state = None  # the state after the prompt and `read`
        self.read = None  # [B, n] generated tokens `state` has read
        self.pending = None  # the generated tokens the forward in flight reads

    def begin(self, input_ids, attention_mask, inputs_embeds, start_state) -> None:
        self.prompt_length = input_ids.shape[1]
        self.start_state = start_state
        parts = [input_ids, attention_mask, inputs_embeds]
        parts += [layer.movedim(1, 0) for layer in start_state or ()]
        rows = torch.cat(
            [input_ids.new_zeros(input_ids.shape[0], 1).double()]
            + [p.flatten(1).double() for p in parts if p is not None],
            dim=1,
        )
        self.groups = torch.unique(rows, dim=0, return_inverse=True)[1]

    def state_for(self, generated: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The state after the prompt and `generated` [B, n], or None when some row's is not known."""
        if self.state is None or self.read is None or self.read.shape != generated.shape:
            return None
        if torch.equal(self.read, generated):
            return self.state
        same = (generated[:, None] == self.read[None]).all(-1) & (self.groups[:, None] == self.groups[None])
        if not bool(same.any(1).all()):
            return None
        source = same.int().argmax(1)
        return tuple(layer.index_select(1, source) for layer in self.state)


def expand_state(state: tuple[torch.Tensor, ...] | None, batch: int) -> tuple[torch.Tensor, ...] | None:
    """A caller's starting state for `batch` rows: generate repeats each prompt num_return_sequences (or num_beams)
    times, and its state with it."""
    if state is None or state[0].shape[1] == batch:
        return state
    rows = state[0].shape[1]
    if batch % rows:
        raise ValueError(f"generate got a state for {rows} rows and {batch} sequences to continue")
    return tuple(layer.repeat_interleave(batch // rows, dim=1) for layer in state)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ZooRnnOutput(ModelOutput):
    """last_hidden_state [B, T, H]; state: one [S, B, N, D] tensor per layer (the recurrent cache); hidden_states
    (output_hidden_states=True): the embeddings, then each layer's output (the last one after the final norm)."""

    last_hidden_state: torch.FloatTensor | None = None
    state: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ZooRnnCausalLMOutput(ModelOutput):
    """loss: mean next-token cross-entropy over every labelled position (whatever `logits_to_keep`);
    logits [B, kept positions, V]; state: one [S, B, N, D] tensor per layer."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    state: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Layers and models
# ---------------------------------------------------------------------------------------------------------------------


class ZooRnnLayer(GradientCheckpointingLayer):
    """(pre-norm) -> input projection -> multi-head recurrence -> (residual). Under activation checkpointing
    (`gradient_checkpointing_enable()`) each call, one chunk of time steps, keeps only its input and state and is
    recomputed in the backward: BPTT's memory grows with the number of chunks, not with the context."""

    def __init__(self, config: ZooRnnConfig, input_size: int):
        super().__init__()
        input_gates, recurrent_gates, bias_rows, _ = CELL_SHAPES[config.cell]
        self.cell = config.cell
        self.configured_backend = config.backend
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.norm = nn.LayerNorm(input_size, eps=config.layer_norm_eps) if config.layer_norm else None
        self.residual = config.residual
        self.input_proj = nn.Linear(input_size, input_gates * config.hidden_size, bias=False)
        self.recurrent_kernel = nn.Parameter(
            torch.empty(recurrent_gates, config.num_heads, config.head_dim, config.head_dim)
        )
        self.bias = nn.Parameter(torch.empty(bias_rows, config.num_heads, config.head_dim))
        self._fused_fallback = False  # set when FlashRNN's fused kernel cannot fit this shape

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        batch, steps, _ = x.shape
        normed = self.norm(x) if self.norm is not None else x
        h_all, state = self.recur(
            run_recurrence, normed, self.input_proj.weight, self.recurrent_kernel, self.bias, state
        )
        out = h_all.reshape(batch, steps, -1)
        return (out + x if self.residual else out), state

    def stacked_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor], state: torch.Tensor):
        """P copies of this layer with their own weights, run as one layer of P * N heads.

        x [P, B, T, in]; `weights` maps this layer's parameter names to [P, *shape] stacks; state [S, B, P, N, D].
        """
        models, batch, steps, _ = x.shape
        heads, dim = self.num_heads, self.head_dim
        normed = x
        if self.norm is not None:
            normed = stacked_layer_norm(x, weights["norm.weight"], weights["norm.bias"], self.norm.eps)
        wx = stacked_linear(normed, weights["input_proj.weight"]).view(models, batch, steps, -1, heads, dim)
        # head dims (P, N) = model p, head n. R is laid out so once (matmul folds (P, N) into one batch dim only
        # when they are contiguous); wx and b are only viewed
        R = weights["recurrent_kernel"].transpose(0, 1).contiguous()  # [G, P, N, D, D]
        b = weights["bias"].transpose(0, 1)  # [G_b, P, N, D]
        h_all, state = self.recur(run_projected, wx.permute(1, 2, 3, 0, 4, 5), R, b, state)  # h_all [B, T, P, N, D]
        out = h_all.permute(2, 0, 1, 3, 4).reshape(models, batch, steps, heads * dim)
        return (out + x if self.residual else out), state

    def members_forward(self, x: torch.Tensor, changes: dict, state: torch.Tensor, shared_input=None):
        """M perturbed copies of this layer sharing its weights, their inputs x [M, B, T, in] folded into one batch:
        `changes` maps this layer's parameter names to ("lowrank", A, B) — the member's change of a matrix is
        A B^T — or ("dense", [M, *shape]); absent means unchanged. state [S, M, B, N, D].

        The projected inputs are one shared product plus, per member, one small matmul that adds every per-member
        term at once: [low-rank inputs | 1] @ [their output factors ; the member's bias]. `shared_input`, for a
        first layer without a pre-norm, is (x's shared part through W [B, T, out], lhs [M, B, T, k], rhs
        [M, k, out]): the members' embedding changes through W, computed by the caller (members_loss)."""
        members, batch, steps, _ = x.shape
        normed = x
        if self.norm is not None:
            weight = member_values(self.norm.weight, changes.get("norm.weight"))
            bias = member_values(self.norm.bias, changes.get("norm.bias"))
            normed = stacked_layer_norm(x, weight.expand(members, -1), bias.expand(members, -1), self.norm.eps)
        rows = normed.reshape(members, batch * steps, -1)
        lhs, rhs = [], []
        if shared_input is None:
            base = F.linear(rows, self.input_proj.weight)
        else:
            base, first_lhs, first_rhs = shared_input
            base = base.reshape(1, batch * steps, -1)
            lhs.append(first_lhs.reshape(members, batch * steps, -1))
            rhs.append(first_rhs)
        change = changes.get("input_proj.weight")
        if change is not None:
            lhs.append(torch.bmm(rows, change[2]) if change[0] == "lowrank" else rows)
            rhs.append(change[1].transpose(1, 2))
        bias = member_values(self.bias, changes.get("bias")).expand(members, -1, -1, -1)
        b_hn = None
        if self.cell == "gru":  # (b_hn, b_r, b_z, b_in): b_hn acts inside the reset product, the rest on the input
            b_hn, bias = bias[:, 0], bias[:, 1:]
        lhs.append(rows.new_ones(members, batch * steps, 1))
        rhs.append(bias.reshape(members, 1, -1))
        xb = torch.baddbmm(base, torch.cat(lhs, 2), torch.cat(rhs, 1))
        xb = xb.view(members, batch, steps, -1, self.num_heads, self.head_dim)
        hidden, state = member_recurrence(
            self.cell, xb, self.recurrent_kernel, b_hn, state, changes.get("recurrent_kernel")
        )
        out = hidden.reshape(members, batch, steps, -1)
        return (out + x if self.residual else out), state

    def recur(self, run, *inputs):
        """`run(cell, backend, *inputs)` on this layer's backend. FlashRNN raises ValueError when its fused kernel
        cannot fit the shape; "auto" then uses `cuda` for this layer from now on."""
        backend = resolve_backend(self.configured_backend, self.cell, inputs[0].device)
        if backend == "cuda_fused" and self._fused_fallback:
            backend = "cuda"
        try:
            return run(self.cell, backend, *inputs)
        except ValueError:
            if backend != "cuda_fused" or self.configured_backend != "auto":
                raise
            self._fused_fallback = True
            return run(self.cell, "cuda", *inputs)


class ZooRnnPreTrainedModel(PreTrainedModel):
    config_class = ZooRnnConfig
    config: ZooRnnConfig
    base_model_prefix = "model"
    _no_split_modules = ["ZooRnnLayer"]
    _is_stateful = True
    supports_gradient_checkpointing = True  # per layer and chunk, the state carried (ZooRnnLayer)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state, not attention keys/values

    def should_save_on_this_rank(self, is_main_process: bool) -> bool:
        # Every process holds the whole model (never sharded), so the caller decides who writes: with a disk per
        # machine, each machine's first process (transformers would otherwise write on global rank 0 only).
        return is_main_process

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        config = self.config
        if isinstance(module, ZooRnnLayer):
            fan_in = module.input_proj.in_features
            init.uniform_(module.input_proj.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            bound = 1 / math.sqrt(module.head_dim)
            init.uniform_(module.recurrent_kernel, -bound, bound)
            init.zeros_(module.bias)
            if not getattr(module.bias, "_is_hf_initialized", False):
                # Memory-keeping gate: LSTM bias row 1 is the forget gate, GRU row 2 the update gate.
                module.bias[1 if module.cell == "lstm" else 2] = config.forget_bias
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.embedding_init_std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Zero recurrent state, one [S, B, N, D] tensor per layer."""
        config = self.config
        shape = (CELL_SHAPES[config.cell][3], batch_size, config.num_heads, config.head_dim)
        return tuple(torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(config.num_hidden_layers))


class ZooRnnModel(ZooRnnPreTrainedModel):
    """Embedding -> stacked multi-head recurrent layers -> (final norm). Returns hidden states and the state."""

    def __init__(self, config: ZooRnnConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        self.layers = nn.ModuleList(
            ZooRnnLayer(config, config.embedding_size if i == 0 else config.hidden_size)
            for i in range(config.num_hidden_layers)
        )
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.layer_norm else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ZooRnnOutput:
        check_extra_inputs(type(self).__name__, output_attentions, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ZooRnnModel.forward needs exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        steps = inputs_embeds.shape[1]
        if steps == 0:
            raise ValueError(EMPTY_INPUT)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        padding = padding_of(attention_mask, steps)
        state = list(state if state is not None else self.initial_state(inputs_embeds.shape[0]))
        # Time chunks bound each recurrent call; the state carries across them exactly. Left padding splits a chunk
        # where a row's text starts, and a row still padded keeps its state through the span.
        spans = [
            span
            for start in range(0, steps, self.config.chunk_size)
            for span in unpadded_spans(padding, start, min(start + self.config.chunk_size, steps))
        ]
        if output_hidden_states:  # layer by layer: every returned tensor is the one the next layer read
            all_hidden = [inputs_embeds]
            for i, layer in enumerate(self.layers):
                pieces = []
                for low, high, padded in spans:
                    piece, state[i] = self.step_layer(layer, all_hidden[-1][:, low:high], state[i], padded)
                    pieces.append(piece)
                all_hidden.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
            hidden = all_hidden[-1]
        else:  # span by span through every layer: nothing context-sized besides the output
            pieces = []
            for low, high, padded in spans:
                piece = inputs_embeds[:, low:high]
                for i, layer in enumerate(self.layers):
                    piece, state[i] = self.step_layer(layer, piece, state[i], padded)
                pieces.append(piece)
            hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if self.norm_f is not None:
            hidden = self.norm_f(hidden)
        if output_hidden_states:
            all_hidden = tuple(all_hidden[:-1]) + (hidden,)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return ZooRnnOutput(
            last_hidden_state=hidden,
            state=tuple(state) if use_cache else None,
            hidden_states=all_hidden if output_hidden_states else None,
        )

    @staticmethod
    def step_layer(layer, hidden: torch.Tensor, state: torch.Tensor, padded: torch.Tensor | None):
        """One layer over one span; rows still in their left padding keep the state they had."""
        hidden, new_state = layer(hidden, state)
        if padded is not None:
            new_state = torch.where(padded.view(1, -1, 1, 1), state, new_state)
        return hidden, new_state


class ZooRnnForCausalLM(ZooRnnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: ZooRnnConfig):
        super().__init__(config)
        self.model = ZooRnnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.output_bias)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> ZooRnnCausalLMOutput:
        r"""
        labels (`torch.LongTensor` [B, T], *optional*):
            Next-token targets as in every transformers causal LM: position t is scored against labels[t + 1];
            -100 is ignored. The loss is accumulated chunk by chunk, so with `logits_to_keep=1` a forward over any
            length keeps only one chunk of logits in memory.
        state (`tuple[torch.Tensor]`, *optional*):
            Recurrent state to start from (the `state` of a previous output); zeros when None.
        attention_mask (`torch.Tensor` [B, T] or [B, past + T], *optional*):
            Left padding (zeros, then ones per row): a row's state stays as it was through its padded positions,
            so each row computes what it would alone; the logits at padded positions mean nothing and are never
            scored (the loss is each row's own). Any other mask is an error.
        logits_to_keep (`int`, defaults to 0):
            Return logits for the last `logits_to_keep` positions only; 0 returns all of them.
        num_items_in_batch (*optional*): divide the summed loss by this count (transformers' Trainer passes the
            labelled tokens of a whole accumulated batch) instead of this batch's labelled positions.
        shift_labels (`torch.LongTensor` [B, T], *optional*): targets already aligned with the positions (position
            t scored against shift_labels[t]), instead of `labels`.
        """
        check_extra_inputs(type(self).__name__, output_attentions, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # Embed and score chunk by chunk: nothing context-sized is allocated besides the inputs themselves (not even
        # `split`'s tuple of views, which costs ~20 MB per million tokens).
        source = input_ids if inputs_embeds is None else inputs_embeds
        steps = source.shape[1]
        if steps == 0:
            raise ValueError(EMPTY_INPUT)
        padding = padding_of(attention_mask, steps)
        scoring = labels is not None or shift_labels is not None
        weight_dtype = self.model.embeddings.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        loss_dtype = torch.promote_types(weight_dtype, torch.float32)  # never score in half precision
        loss_sum = torch.zeros((), dtype=loss_dtype, device=source.device)
        scored = 0
        kept_logits, hidden_states = [], []
        keep_from = 0 if logits_to_keep == 0 else max(steps - logits_to_keep, 0)
        # hidden states are whole-sequence tensors anyway: then one call, so that each is the one the model used
        span = steps if output_hidden_states else self.config.chunk_size
        for start in range(0, steps, span):
            end = min(start + span, steps)
            piece = source[:, start:end]
            chunk = self.model.embeddings(piece) if inputs_embeds is None else piece
            chunk_mask = (
                None if padding is None else (torch.arange(start, end, device=piece.device) >= padding[:, None])
            )
            out = self.model(
                inputs_embeds=chunk,
                state=state,
                attention_mask=chunk_mask,
                use_cache=True,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            state = out.state
            if output_hidden_states:
                hidden_states.append(out.hidden_states)
            if scoring or end > keep_from:
                logits = self.lm_head(out.last_hidden_state)
                if scoring:
                    if shift_labels is not None:
                        chunk_targets = shift_labels[:, start:end]
                    else:
                        chunk_targets = shifted_targets(labels, start, end)
                    if chunk_mask is not None:  # a prediction made from padding is not the model's: never score it
                        chunk_targets = chunk_targets.masked_fill(~chunk_mask, IGNORE_INDEX)
                    loss_sum = loss_sum + F.cross_entropy(
                        logits.to(loss_dtype).flatten(0, 1),
                        chunk_targets.flatten(),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                    scored += int((chunk_targets != IGNORE_INDEX).sum())
                if end > keep_from:
                    kept_logits.append(logits[:, max(keep_from - start, 0) :])
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        loss = None
        if scoring:
            loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else scored)
        return ZooRnnCausalLMOutput(
            loss=loss,
            logits=kept_logits[0] if len(kept_logits) == 1 else torch.cat(kept_logits, dim=1),
            state=state if use_cache else None,
            hidden_states=hidden_states[0] if output_hidden_states else None,
        )

    def generate(self, *args, **kwargs):
        """transformers' `generate`, with a fresh record of the recurrent state (see `RecurrentGenerationRecord`)."""
        kwargs[GENERATION_RECORD] = RecurrentGenerationRecord()
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        state: tuple[torch.Tensor, ...] | None = None,
        recurrent_record: RecurrentGenerationRecord | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """The next step's inputs: the newest token and the state after everything before it, or, without a known
        state (the prompt, `use_cache=False`, a row beam search could not match), the whole sequence from the
        starting state. `state` continues from a previous output's state."""
        forwarded = {key: value for key, value in kwargs.items() if key not in GENERATION_ONLY_INPUTS}
        record = recurrent_record if recurrent_record is not None else RecurrentGenerationRecord()
        if record.groups is None:
            start = expand_state(state, input_ids.shape[0])
            record.begin(input_ids, attention_mask, inputs_embeds, start)
        generated = input_ids[:, record.prompt_length :]
        carried = record.state_for(generated[:, :-1]) if use_cache is not False and generated.shape[1] else None
        record.pending = generated
        if carried is not None:
            return {"input_ids": generated[:, -1:], "state": carried, "use_cache": use_cache, **forwarded}
        if inputs_embeds is not None:
            embeds = torch.cat([inputs_embeds, self.get_input_embeddings()(generated).to(inputs_embeds.dtype)], dim=1)
            inputs = {"inputs_embeds": embeds}
        else:
            inputs = {"input_ids": input_ids}
        return {
            **inputs,
            "state": record.start_state,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
            **forwarded,
        }

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        """transformers' bookkeeping (the attention mask grows), then the record takes the state this step made."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        for name in ("state", "cache"):  # some releases copy these names: the record alone carries the state
            model_kwargs.pop(name, None)
        record = model_kwargs.get(GENERATION_RECORD)
        if record is not None:
            record.state, record.read = outputs.get("state"), record.pending
        return model_kwargs

    def stacked_loss(
        self, parameters: dict[str, torch.Tensor], input_ids: torch.LongTensor, labels: torch.LongTensor
    ) -> torch.Tensor:
        """Losses of P models in one forward (zero-order probes): `parameters` maps every parameter name, tied
        weights once as `named_parameters()` lists them, to a [P, *shape] stack of the P models' values.

        Each layer runs as one layer of P * N heads — the block-diagonal recurrence makes P models one wider
        model — so P small models cost far less than P forwards. Returns [P] losses; model p's equals
        `forward(input_ids, labels=labels).loss` with its parameters, up to floating-point summation order.
        """
        config = self.config
        embeddings = parameters["model.embeddings.weight"]  # [P, V, E]
        models, batch = embeddings.shape[0], input_ids.shape[0]
        head_weight = embeddings if config.tie_word_embeddings else parameters["lm_head.weight"]
        head_bias = parameters.get("lm_head.bias")
        layer_weights = by_layer(parameters, config.num_hidden_layers)
        state_shape = (CELL_SHAPES[config.cell][3], batch, models, config.num_heads, config.head_dim)
        states = [embeddings.new_zeros(state_shape) for _ in layer_weights]
        loss_dtype = torch.promote_types(embeddings.dtype, torch.float32)
        loss_sum = embeddings.new_zeros(models, dtype=loss_dtype)
        scored, steps = 0, input_ids.shape[1]
        for start in range(0, steps, config.chunk_size):
            end = min(start + config.chunk_size, steps)
            hidden = embeddings[:, input_ids[:, start:end]]  # [P, B, t, E]
            for i, layer in enumerate(self.model.layers):
                hidden, states[i] = layer.stacked_forward(hidden, layer_weights[i], states[i])
            if self.model.norm_f is not None:
                weight, bias = parameters["model.norm_f.weight"], parameters["model.norm_f.bias"]
                hidden = stacked_layer_norm(hidden, weight, bias, config.layer_norm_eps)
            logits = stacked_linear(hidden, head_weight, head_bias)  # [P, B, t, V]
            chunk_sums, chunk_scored = per_model_loss_sums(logits, shifted_targets(labels, start, end), loss_dtype)
            loss_sum += chunk_sums
            scored += chunk_scored
        return loss_sum / scored

    def stacked_bytes_per_model(self, batch_size: int, steps: int) -> int:
        """Rough memory one more model adds to `stacked_loss`: its weights, and one time chunk of activations
        (embeddings, projected inputs and their re-laid copy, hidden states, logits and their log-softmax)."""
        config = self.config
        input_gates = CELL_SHAPES[config.cell][0]
        weights = sum(p.numel() * p.element_size() for p in self.parameters())
        per_token = config.embedding_size + config.num_hidden_layers * config.hidden_size * (2 * input_gates + 2)
        per_token += 2 * config.vocab_size
        return weights + batch_size * min(steps, config.chunk_size) * per_token * 4

    def members_loss(self, changes: dict, input_ids: torch.LongTensor, labels: torch.LongTensor) -> torch.Tensor:
        """Losses of M perturbed copies of this model in one forward over [M x B] sequences, with no copy of the
        weights: every member reads the shared parameters plus its own change. `changes` maps parameter names
        (tied weights once, as `named_parameters()` lists them) to ("lowrank", A [M, *, m, r], B [M, *, n, r]) —
        the member's change of a matrix is A B^T, of a stacked tensor such as the recurrent kernel [G, N, D, D] one
        per block — or ("dense", [M, *shape]); absent parameters are unchanged. The change of an embedding row is
        A[row] B^T, a lookup. Returns [M] losses; member m's equals `forward(input_ids, labels=labels).loss` with
        its parameters, up to floating-point summation order (tested)."""
        config = self.config
        members = next(iter(changes.values()))[1].shape[0]
        embedding_change = changes.get("model.embeddings.weight")
        head_change = embedding_change if config.tie_word_embeddings else changes.get("lm_head.weight")
        layer_changes = by_layer(changes, config.num_hidden_layers)
        batch = input_ids.shape[0]
        state_shape = (CELL_SHAPES[config.cell][3], members, batch, config.num_heads, config.head_dim)
        embedding_weight = self.model.embeddings.weight
        states = [embedding_weight.new_zeros(state_shape) for _ in layer_changes]
        loss_dtype = torch.promote_types(embedding_weight.dtype, torch.float32)
        loss_sum = embedding_weight.new_zeros(members, dtype=loss_dtype)
        scored, steps = 0, input_ids.shape[1]
        # Without a pre-norm the first layer's input projection is linear in the shared embedding: W e once for all
        # members, and W A[ids] B^T = A[ids] (W B)^T per member, r numbers per token; (W B)^T is the same every chunk
        first = self.model.layers[0]
        shares_projection = first.norm is None and (embedding_change is None or embedding_change[0] == "lowrank")
        if shares_projection:
            projection = first.input_proj.weight
            if embedding_change is None:
                first_rhs = projection.new_zeros(members, 0, projection.shape[0])
            else:
                first_rhs = torch.matmul(projection, embedding_change[2]).transpose(1, 2)  # [M, r, out]
        for start in range(0, steps, config.chunk_size):
            end = min(start + config.chunk_size, steps)
            ids = input_ids[:, start:end]
            embedded = self.model.embeddings(ids)  # [B, t, E], shared
            hidden = embedded.expand(members, -1, -1, -1)  # [M, B, t, E]
            if embedding_change is not None:
                hidden = hidden + member_lookup(embedding_change, ids)
            shared_input = None
            if shares_projection:
                if embedding_change is None:
                    first_lhs = embedded.new_zeros(members, *ids.shape, 0)
                else:
                    first_lhs = embedding_change[1][:, ids]  # [M, B, t, r]
                shared_input = (F.linear(embedded, projection), first_lhs, first_rhs)
            for i, layer in enumerate(self.model.layers):
                hidden, states[i] = layer.members_forward(
                    hidden, layer_changes[i], states[i], shared_input if i == 0 else None
                )
            if self.model.norm_f is not None:
                norm = self.model.norm_f
                scale = member_values(norm.weight, changes.get("model.norm_f.weight")).expand(members, -1)
                shift = member_values(norm.bias, changes.get("model.norm_f.bias")).expand(members, -1)
                hidden = stacked_layer_norm(hidden, scale, shift, norm.eps)
            logits = F.linear(hidden, self.lm_head.weight)  # [M, B, t, V]
            if head_change is not None:
                logits = logits + member_linear_change(hidden, head_change)
            if self.lm_head.bias is not None:
                logits = logits + member_values(self.lm_head.bias, changes.get("lm_head.bias"))[:, None, None]
            chunk_sums, chunk_scored = per_model_loss_sums(logits, shifted_targets(labels, start, end), loss_dtype)
            loss_sum += chunk_sums
            scored += chunk_scored
        return loss_sum / scored

    def members_bytes_per_member(self, batch_size: int, steps: int) -> int:
        """Rough memory one more member adds to `members_loss`: one time chunk of its activations (no weights)."""
        config = self.config
        input_gates = CELL_SHAPES[config.cell][0]
        per_token = config.embedding_size + config.num_hidden_layers * config.hidden_size * (2 * input_gates + 4)
        per_token += 3 * config.vocab_size
        return batch_size * min(steps, config.chunk_size) * per_token * 4


__all__ = ["ZooRnnForCausalLM", "ZooRnnModel", "ZooRnnPreTrainedModel", "ZooRnnLayer"]
