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
from transformers.utils import ModelOutput

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
    """LSTM as a head-major loop. Shapes as `lstm_dense`; returns (h of every step [B,T,N,D], state [2,B,N,D]).

    Each gate is one batched matmul per step against a transposed *view* of R: nothing weight-sized is ever
    copied, which matters when R holds a billion parameters."""
    batch, steps, _ = x.shape
    _, heads, dim = b.shape
    # input pre-activations laid out [T, gate, N, B, D] so xt[t, g] is the additive term of gate g at step t
    xt = (F.linear(x, W).view(batch, steps, 4, heads, dim) + b).permute(1, 2, 3, 0, 4).contiguous()
    r = R.transpose(2, 3)  # [4, N, D_in, D_out], a view
    h, c = state[0].transpose(0, 1), state[1].transpose(0, 1)
    outputs = []
    for t in range(steps):
        i = torch.sigmoid(torch.baddbmm(xt[t, 0], h, r[0]))
        f = torch.sigmoid(torch.baddbmm(xt[t, 1], h, r[1]))
        z = torch.tanh(torch.baddbmm(xt[t, 2], h, r[2]))
        o = torch.sigmoid(torch.baddbmm(xt[t, 3], h, r[3]))
        c = torch.addcmul(f * c, i, z)
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs).permute(2, 0, 1, 3), torch.stack((h, c)).transpose(1, 2)


def gru_loop(x, W, R, b, state):
    """GRU as a head-major loop: h' = z * h + (1 - z) * tanh(x_n + b_in + r * (R_n h + b_hn)); per-gate matmuls
    against transposed views of R, as in `lstm_loop`."""
    batch, steps, _ = x.shape
    _, heads, dim = b.shape
    wx = F.linear(x, W).view(batch, steps, 3, heads, dim).permute(1, 2, 3, 0, 4)  # [T, gate (r, z, n), N, B, D]
    b_hn, b_r, b_z, b_in = (row[:, None, :] for row in b)  # each [N, 1, D]
    x_r, x_z, x_n = (wx[:, 0] + b_r).contiguous(), (wx[:, 1] + b_z).contiguous(), (wx[:, 2] + b_in).contiguous()
    r = R.transpose(2, 3)  # [3 (n, r, z), N, D_in, D_out], a view
    h = state[0].transpose(0, 1)
    outputs = []
    for t in range(steps):
        reset = torch.sigmoid(torch.baddbmm(x_r[t], h, r[1]))
        update = torch.sigmoid(torch.baddbmm(x_z[t], h, r[2]))
        candidate = torch.tanh(torch.addcmul(x_n[t], reset, torch.baddbmm(b_hn, h, r[0])))
        h = torch.lerp(candidate, h, update)
        outputs.append(h)
    return torch.stack(outputs).permute(2, 0, 1, 3), h.transpose(0, 1)[None]


TORCH_CELLS = {
    ("lstm", "dense"): lstm_dense,
    ("gru", "dense"): gru_dense,
    ("lstm", "loop"): lstm_loop,
    ("gru", "loop"): gru_loop,
}


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
    if backend == "torch":
        return TORCH_CELLS[cell, cpu_path(heads, heads * dim)](x, W, R, b, state)
    wx = F.linear(x, W).view(x.shape[0], x.shape[1], -1, heads, dim)
    states_all, last = flashrnn_kernel(
        Wx=wx, R=R, b=b, states=state[:, :, None], function=cell, backend=backend, dtype=FLASHRNN_DTYPES[wx.dtype]
    )
    return states_all[0], last[:, :, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ZooRnnOutput(ModelOutput):
    """last_hidden_state [B, T, H]; state: one [S, B, N, D] tensor per layer (the recurrent cache)."""

    last_hidden_state: torch.FloatTensor | None = None
    state: tuple[torch.Tensor, ...] | None = None


@dataclass
class ZooRnnCausalLMOutput(ModelOutput):
    """loss: mean next-token cross-entropy over every labelled position (whatever `logits_to_keep`);
    logits [B, kept positions, V]; state: one [S, B, N, D] tensor per layer."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    state: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Layers and models
# ---------------------------------------------------------------------------------------------------------------------


class ZooRnnLayer(nn.Module):
    """(pre-norm) -> input projection -> multi-head recurrence -> (residual)."""

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
        backend = resolve_backend(self.configured_backend, self.cell, x.device)
        if backend == "cuda_fused" and self._fused_fallback:
            backend = "cuda"
        try:
            h_all, state = run_recurrence(
                self.cell, backend, normed, self.input_proj.weight, self.recurrent_kernel, self.bias, state
            )
        except ValueError:
            # FlashRNN raises ValueError when the fused kernel cannot fit the shape; "auto" then uses `cuda`.
            if backend != "cuda_fused" or self.configured_backend != "auto":
                raise
            self._fused_fallback = True
            h_all, state = run_recurrence(
                self.cell, "cuda", normed, self.input_proj.weight, self.recurrent_kernel, self.bias, state
            )
        out = h_all.reshape(batch, steps, -1)
        return (out + x if self.residual else out), state


class ZooRnnPreTrainedModel(PreTrainedModel):
    config_class = ZooRnnConfig
    config: ZooRnnConfig
    base_model_prefix = "model"
    _no_split_modules = ["ZooRnnLayer"]
    _is_stateful = True
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state, not attention keys/values

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

    def _reorder_cache(self, state: tuple[torch.Tensor, ...], beam_idx: torch.LongTensor):
        return tuple(layer_state.index_select(1, beam_idx.to(layer_state.device)) for layer_state in state)


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ZooRnnOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ZooRnnModel.forward needs exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if state is None:
            state = self.initial_state(inputs_embeds.shape[0])
        state = list(state)
        outputs = []
        # Time chunks bound each recurrent call; the state carries across them exactly.
        for chunk in inputs_embeds.split(self.config.chunk_size, dim=1):
            for i, layer in enumerate(self.layers):
                chunk, state[i] = layer(chunk, state[i])
            outputs.append(chunk)
        hidden = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if self.norm_f is not None:
            hidden = self.norm_f(hidden)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return ZooRnnOutput(last_hidden_state=hidden, state=tuple(state) if use_cache else None)


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> ZooRnnCausalLMOutput:
        r"""
        labels (`torch.LongTensor` [B, T], *optional*):
            Next-token targets as in every transformers causal LM: position t is scored against labels[t + 1];
            -100 is ignored. The loss is accumulated chunk by chunk, so with `logits_to_keep=1` a forward over any
            length keeps only one chunk of logits in memory.
        state (`tuple[torch.Tensor]`, *optional*):
            Recurrent state to start from (the `state` of a previous output); zeros when None.
        logits_to_keep (`int`, defaults to 0):
            Return logits for the last `logits_to_keep` positions only; 0 returns all of them.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "ZooRnn is recurrent and cannot skip padded positions (attention_mask has zeros): "
                "pass unpadded inputs, e.g. one prompt at a time or prompts of equal length"
            )
        embeds = self.model.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        steps = embeds.shape[1]
        if labels is not None:
            # Shift once over the whole sequence so chunk boundaries lose no target.
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss_dtype = torch.promote_types(embeds.dtype, torch.float32)  # never score in half precision
        loss_sum = embeds.new_zeros((), dtype=loss_dtype)
        scored = 0
        kept_logits = []
        keep_from = 0 if logits_to_keep == 0 else max(steps - logits_to_keep, 0)
        start = 0
        for chunk in embeds.split(self.config.chunk_size, dim=1):
            end = start + chunk.shape[1]
            out = self.model(inputs_embeds=chunk, state=state, use_cache=True)
            state = out.state
            if labels is not None or end > keep_from:
                logits = self.lm_head(out.last_hidden_state)
                if labels is not None:
                    chunk_targets = targets[:, start:end]
                    loss_sum = loss_sum + F.cross_entropy(
                        logits.to(loss_dtype).flatten(0, 1),
                        chunk_targets.flatten(),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                    scored += int((chunk_targets != IGNORE_INDEX).sum())
                if end > keep_from:
                    kept_logits.append(logits[:, max(keep_from - start, 0) :])
            start = end
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return ZooRnnCausalLMOutput(
            loss=loss_sum / scored if labels is not None else None,
            logits=torch.cat(kept_logits, dim=1),
            state=state if use_cache else None,
        )


__all__ = ["ZooRnnForCausalLM", "ZooRnnModel", "ZooRnnPreTrainedModel", "ZooRnnLayer"]
