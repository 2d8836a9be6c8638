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
# Set (to the error) when FlashRNN's fused kernel cannot be built in this process (flashrnn 1.0.8's gpu_info extension
# under CUDA 13, whose cudaDeviceProp lacks fields it reads): "auto" then runs `cuda` and never retries the build.
FUSED_BUILD_ERROR: str | None = None
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


def matmul_recurrence(r):
    """The model's recurrent term, the cells' default hook: gate g of R h is h @ r[g] (r: R transposed, a view)."""
    return lambda h: lambda g: torch.matmul(h, r[g])


def lstm_cell(recurrent, x, h, c):
    """One LSTM step, the cell written once for every forward: x [4, ..., D] the gates' projected inputs with their
    biases; `recurrent(h)` gives the recurrent terms, gate g's as `recurrent(h)(g)` (a tensor the cell may add to
    in place: a fresh one, or that gate's own slice of one). The model's hook is a plain matmul
    (`matmul_recurrence`); a population's adds each member's change. Gates (i, f, z, o). Returns (h, c)."""
    rh = recurrent(h)
    i = torch.sigmoid(rh(0).add_(x[0]))
    f = torch.sigmoid(rh(1).add_(x[1]))
    z = torch.tanh(rh(2).add_(x[2]))
    o = torch.sigmoid(rh(3).add_(x[3]))
    c = torch.addcmul(f * c, i, z)
    return o * torch.tanh(c), c


def gru_cell(recurrent, x, b_hn, h):
    """One GRU step, the cell written once for every forward: x [3, ..., D] the projected inputs (r, z, n) with b_r,
    b_z, b_in; `recurrent` as in `lstm_cell`, R gates (n, r, z); b_hn acts inside the reset product:
    h' = z * h + (1 - z) * tanh(x_n + r * (R_n h + b_hn))."""
    rh = recurrent(h)
    reset = torch.sigmoid(rh(1).add_(x[0]))
    update = torch.sigmoid(rh(2).add_(x[1]))
    candidate = torch.tanh(rh(0).add_(b_hn).mul_(reset).add_(x[2]))
    return torch.lerp(candidate, h, update)


def lstm_steps(wx, R, b, state):
    """The LSTM loop on projected inputs. wx [B, T, 4, *H, D], R [4, *H, D, D], b [4, *H, D], state [2, B, *H, D],
    where the head dims *H are (N,) for one model and (P, N) for P stacked models.

    Each gate is one batched matmul per step against a transposed *view* of R, and the inputs are read through
    views: nothing weight- or input-sized is re-laid out, which matters when R holds a billion parameters."""
    xb = wx + b  # bias folded in once; still [B, T, 4, *H, D]
    recurrent = matmul_recurrence(R.transpose(-1, -2))  # R^T [4, *H, D_in, D_out], a view
    # [*H, B, D], contiguous: elementwise results inherit their inputs' layout, and matmul wants this one
    h, c = state[0].movedim(0, -2).contiguous(), state[1].movedim(0, -2).contiguous()
    outputs = []
    for t in range(wx.shape[1]):
        h, c = lstm_cell(recurrent, xb[:, t].movedim(0, -2), h, c)  # x [4, *H, B, D], a view
        outputs.append(h)
    return torch.stack(outputs).movedim(-2, 0), torch.stack((h, c)).movedim(-2, 1)


def gru_loop(x, W, R, b, state):
    """GRU as a head-major loop. Shapes as `gru_dense`."""
    batch, steps, _ = x.shape
    return gru_steps(F.linear(x, W).view(batch, steps, 3, *b.shape[1:]), R, b, state)


def gru_steps(wx, R, b, state):
    """The GRU loop on projected inputs, shapes as `lstm_steps` with 3 gates (wx gates (r, z, n), R gates (n, r, z))."""
    b_hn, b_r, b_z, b_in = b
    xb = wx + torch.stack((b_r, b_z, b_in))  # [B, T, 3, *H, D]
    recurrent = matmul_recurrence(R.transpose(-1, -2))  # R^T [3, *H, D_in, D_out], a view
    b_hn = b_hn.unsqueeze(-2)  # [*H, 1, D]
    h = state[0].movedim(0, -2).contiguous()  # [*H, B, D], the layout matmul wants
    outputs = []
    for t in range(wx.shape[1]):
        h = gru_cell(recurrent, xb[:, t].movedim(0, -2), b_hn, h)  # x [3, *H, B, D], a view
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


def shifted_targets(labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Next-token targets of positions [start, end): labels[start + 1 : end + 1]; the last position has none."""
    targets = labels[:, start + 1 : end + 1]
    if end == labels.shape[1]:
        targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    return targets


def read_mask(attention_mask: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """Which of the last `steps` inputs each row reads, [B, steps] bools (the mask may also cover earlier, already
    processed positions, as generate sends it), or None when every row reads every one. A masked position is not
    read: the row's state passes it unchanged. So a row computes what it would without its masked tokens, whether
    they are left padding (batched prompts), right padding (TRL's prompt + completion batches) or in between."""
    if attention_mask is None or bool(attention_mask[:, -steps:].all()):
        return None
    return attention_mask[:, -steps:].bool()


def read_spans(mask: torch.Tensor | None, start: int, end: int):
    """Split positions [start, end) wherever a row starts or stops reading: yields (from, to, rows that read
    nothing in [from, to), or None when every row reads all of it). Those rows' state must stay as it was."""
    if mask is None:
        yield start, end, None
        return
    part = mask[:, start:end]
    changes = (part[:, 1:] != part[:, :-1]).any(0).nonzero().flatten() + start + 1
    cuts = [start, *changes.tolist(), end]
    for low, high in zip(cuts, cuts[1:], strict=False):
        skipped = ~mask[:, low]
        yield low, high, skipped if bool(skipped.any()) else None


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

    def recur(self, run, *inputs):
        """`run(cell, backend, *inputs)` on this layer's backend. FlashRNN raises ValueError when its fused kernel
        cannot fit the shape, and RuntimeError ("Error building extension ...") when it cannot be compiled here;
        "auto" then uses `cuda` for this layer (a build failure: for every layer of the process) from now on."""
        global FUSED_BUILD_ERROR
        backend = resolve_backend(self.configured_backend, self.cell, inputs[0].device)
        auto = self.configured_backend == "auto"
        if backend == "cuda_fused" and (self._fused_fallback or (auto and FUSED_BUILD_ERROR is not None)):
            backend = "cuda"
        try:
            return run(self.cell, backend, *inputs)
        except (ValueError, RuntimeError) as error:
            if backend != "cuda_fused" or not auto:
                raise
            if isinstance(error, RuntimeError):
                if "Error building extension" not in str(error):
                    raise
                FUSED_BUILD_ERROR = str(error)
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
        mask = read_mask(attention_mask, steps)
        state = list(state if state is not None else self.initial_state(inputs_embeds.shape[0]))
        # Time chunks bound each recurrent call; the state carries across them exactly. A mask splits a chunk where a
        # row starts or stops reading, and a row that reads nothing in a span keeps its state through it.
        spans = [
            span
            for start in range(0, steps, self.config.chunk_size)
            for span in read_spans(mask, start, min(start + self.config.chunk_size, steps))
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
        """One layer over one span; rows that read nothing in it (masked) keep the state they had."""
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
            Zeros mark positions a row does not read (left or right padding, or masked tokens): the row's state
            stays as it was through them, so each row computes what it would without them; the logits at masked
            positions mean nothing and are never scored (the loss is each row's own).
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
        mask = read_mask(attention_mask, steps)
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
            chunk_mask = None if mask is None else mask[:, start:end]
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
                    # a prediction made at a masked position is not the model's: never score it
                    if chunk_mask is not None:
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


__all__ = ["ZooRnnForCausalLM", "ZooRnnModel", "ZooRnnPreTrainedModel", "ZooRnnLayer"]
