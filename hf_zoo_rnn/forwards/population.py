"""Population forwards: the losses of many perturbed copies of a ZooRnn model in one forward, for zero-order probes.

Two views, both exact (each model's loss equals its own forward's, up to summation order; tested):

* stacked: P models with their own weights ([P, *shape] stacks), each layer run as one layer of P * N heads: the
  block-diagonal recurrence makes P small models one wider model.
* members: M perturbed copies that share the model's weights and differ by a low-rank (or dense) change, their
  inputs folded into the batch: no copy of the weights, the shared products computed once.

The shipped model file knows nothing of these (it is the inference model); they read its layers' parameters.
hf_zoo_rnn.estimators.zero_order.population_loss wraps either view in the `PopulationLoss` the optimiser takes.
"""

import torch
import torch.nn.functional as F

from ..modeling_zoo_rnn import (
    CELL_SHAPES,
    ZooRnnForCausalLM,
    ZooRnnLayer,
    block_diagonal,
    cpu_path,
    gru_cell,
    lstm_cell,
    read_spans,
    run_projected,
)
from .next_token import per_model_loss_sums


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


def member_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of each member's table [M, V, ...]: at the shared ids [B, t], or at each member's own ids [M, B, t]
    -> [M, B, t, ...]."""
    if ids.dim() == 2:
        return table[:, ids]
    return table[torch.arange(table.shape[0], device=ids.device).view(-1, 1, 1), ids]


def member_lookup(change, ids: torch.Tensor) -> torch.Tensor:
    """Each member's change of the embedding rows `ids` ([B, t] shared, or [M, B, t]) -> [M, B, t, E]: A[ids] B^T,
    or the dense rows."""
    if change[0] == "dense":
        return member_rows(change[1], ids)
    _, a, b = change
    rows = member_rows(a, ids)  # [M, B, t, r]
    return torch.matmul(rows.flatten(1, 2), b.transpose(1, 2)).view(*rows.shape[:-1], b.shape[1])


def member_values(base: torch.Tensor, change) -> torch.Tensor:
    """[M, *shape]: a dense parameter (a bias, a norm) of every member: base + its change, or base shared."""
    return base + change[1] if change is not None else base[None]


def member_recurrence(cell: str, xb, R, b_hn, state, change):
    """The recurrence of M members folded into the batch: xb [M, B, T, G, N, D] projected inputs with their
    biases, R [G, N, D, D] shared, b_hn [M, N, D] (GRU: the bias inside the reset product; None for LSTM),
    state [S, M, B, N, D]; `change` is the members' low-rank change of R,
    ("lowrank", A [M, G, N, D, r], B [M, G, N, D, r]) or None. The cell is the model's (`lstm_cell`, `gru_cell`);
    its recurrent hook is one matmul of the shared R per step (every gate, every member's rows; R dense where
    `cpu_path` makes the single-model forward dense too), plus (h B) A^T per member and head.
    Returns (h of every step [M, B, T, N, D], state)."""
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

    def recurrent(h):  # h [M, B, N, D] -> gate g's R h per member: [M, B, N, D]
        if dense:
            out = torch.matmul(h.reshape(members * batch, -1), r_all).view(members, batch, gates, heads, dim)
        else:
            rows = h.permute(2, 0, 1, 3).reshape(heads, members * batch, dim)
            out = torch.matmul(rows, r_all).view(heads, members, batch, gates, dim).permute(1, 2, 3, 0, 4)
        if change is not None:
            projected = torch.einsum("mbnd,mndk->mbnk", h, b_all).view(members, batch, heads, gates, rank)
            out = out + torch.einsum("mbngr,mngro->mbgno", projected, a_all)
        return lambda g: out[:, :, g]

    if cell == "lstm":
        h, c = state[0], state[1]
    else:
        b_hn = b_hn[:, None]  # [M, 1, N, D]
        h = state[0]
    outputs = []
    for x in xb.unbind(2):  # [M, B, G, N, D] per step
        x = x.movedim(2, 0)  # [G, M, B, N, D], a view: the cell indexes gates first
        if cell == "lstm":
            h, c = lstm_cell(recurrent, x, h, c)
        else:
            h = gru_cell(recurrent, x, b_hn, h)
        outputs.append(h)
    return torch.stack(outputs, dim=2), (torch.stack((h, c)) if cell == "lstm" else h[None])


def by_layer(values: dict, num_layers: int) -> list[dict]:
    """Split a parameter-name -> value mapping into one mapping per layer, keyed by the name inside the layer."""
    layers = []
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        layers.append({k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)})
    return layers


def stacked_layer(layer: ZooRnnLayer, x: torch.Tensor, weights: dict[str, torch.Tensor], state: torch.Tensor):
    """P copies of `layer` with their own weights, run as one layer of P * N heads.

    x [P, B, T, in]; `weights` maps the layer's parameter names to [P, *shape] stacks; state [S, B, P, N, D].
    """
    models, batch, steps, _ = x.shape
    heads, dim = layer.num_heads, layer.head_dim
    normed = x
    if layer.norm is not None:
        normed = stacked_layer_norm(x, weights["norm.weight"], weights["norm.bias"], layer.norm.eps)
    wx = stacked_linear(normed, weights["input_proj.weight"]).view(models, batch, steps, -1, heads, dim)
    # head dims (P, N) = model p, head n. R is laid out so once (matmul folds (P, N) into one batch dim only
    # when they are contiguous); wx and b are only viewed
    R = weights["recurrent_kernel"].transpose(0, 1).contiguous()  # [G, P, N, D, D]
    b = weights["bias"].transpose(0, 1)  # [G_b, P, N, D]
    h_all, state = layer.recur(run_projected, wx.permute(1, 2, 3, 0, 4, 5), R, b, state)  # h_all [B, T, P, N, D]
    out = h_all.permute(2, 0, 1, 3, 4).reshape(models, batch, steps, heads * dim)
    return (out + x if layer.residual else out), state


def members_layer(layer: ZooRnnLayer, x: torch.Tensor, changes: dict, state: torch.Tensor, shared_input=None):
    """M perturbed copies of `layer` sharing its weights, their inputs x [M, B, T, in] folded into one batch:
    `changes` maps the layer's parameter names to ("lowrank", A, B) — the member's change of a matrix is
    A B^T — or ("dense", [M, *shape]); absent means unchanged. state [S, M, B, N, D].

    The projected inputs are one shared product plus, per member, one small matmul that adds every per-member
    term at once: [low-rank inputs | 1] @ [their output factors ; the member's bias]. `shared_input`, for a
    first layer without a pre-norm, is (x's shared part through W, [B, T, out] or per member [M, B, T, out], lhs
    [M, B, T, k], rhs [M, k, out]): the members' embedding changes through W, computed by the caller."""
    members, batch, steps, _ = x.shape
    normed = x
    if layer.norm is not None:
        weight = member_values(layer.norm.weight, changes.get("norm.weight"))
        bias = member_values(layer.norm.bias, changes.get("norm.bias"))
        normed = stacked_layer_norm(x, weight.expand(members, -1), bias.expand(members, -1), layer.norm.eps)
    rows = normed.reshape(members, batch * steps, -1)
    lhs, rhs = [], []
    if shared_input is None:
        base = F.linear(rows, layer.input_proj.weight)
    else:
        base, first_lhs, first_rhs = shared_input
        base = base.reshape(-1, batch * steps, base.shape[-1])  # [1 or M, B T, out]
        lhs.append(first_lhs.reshape(members, batch * steps, -1))
        rhs.append(first_rhs)
    change = changes.get("input_proj.weight")
    if change is not None:
        lhs.append(torch.bmm(rows, change[2]) if change[0] == "lowrank" else rows)
        rhs.append(change[1].transpose(1, 2))
    bias = member_values(layer.bias, changes.get("bias")).expand(members, -1, -1, -1)
    b_hn = None
    if layer.cell == "gru":  # (b_hn, b_r, b_z, b_in): b_hn acts inside the reset product, the rest on the input
        b_hn, bias = bias[:, 0], bias[:, 1:]
    lhs.append(rows.new_ones(members, batch * steps, 1))
    rhs.append(bias.reshape(members, 1, -1))
    xb = torch.baddbmm(base, torch.cat(lhs, 2), torch.cat(rhs, 1))
    xb = xb.view(members, batch, steps, -1, layer.num_heads, layer.head_dim)
    hidden, state = member_recurrence(
        layer.cell, xb, layer.recurrent_kernel, b_hn, state, changes.get("recurrent_kernel")
    )
    out = hidden.reshape(members, batch, steps, -1)
    return (out + x if layer.residual else out), state


def stacked_loss(
    model: ZooRnnForCausalLM, parameters: dict[str, torch.Tensor], input_ids: torch.LongTensor, labels: torch.LongTensor
) -> torch.Tensor:
    """Losses of P models in one forward (zero-order probes): `parameters` maps every parameter name, tied
    weights once as `named_parameters()` lists them, to a [P, *shape] stack of the P models' values.

    Each layer runs as one layer of P * N heads — the block-diagonal recurrence makes P models one wider
    model — so P small models cost far less than P forwards. Returns [P] losses; model p's equals
    `forward(input_ids, labels=labels).loss` with its parameters, up to floating-point summation order.
    """
    config = model.config
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
        for i, layer in enumerate(model.model.layers):
            hidden, states[i] = stacked_layer(layer, hidden, layer_weights[i], states[i])
        if model.model.norm_f is not None:
            weight, bias = parameters["model.norm_f.weight"], parameters["model.norm_f.bias"]
            hidden = stacked_layer_norm(hidden, weight, bias, config.layer_norm_eps)
        logits = stacked_linear(hidden, head_weight, head_bias)  # [P, B, t, V]
        chunk_sums, chunk_scored = per_model_loss_sums(logits, labels, start, end)
        loss_sum += chunk_sums
        scored += chunk_scored
    return loss_sum / scored


def stacked_bytes_per_model(model: ZooRnnForCausalLM, batch_size: int, steps: int) -> int:
    """Rough memory one more model adds to `stacked_loss`: its weights, and one time chunk of activations
    (embeddings, projected inputs and their re-laid copy, hidden states, logits and their log-softmax)."""
    config = model.config
    input_gates = CELL_SHAPES[config.cell][0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = config.embedding_size + config.num_hidden_layers * config.hidden_size * (2 * input_gates + 2)
    per_token += 2 * config.vocab_size
    return weights + batch_size * min(steps, config.chunk_size) * per_token * 4


class MemberForward:
    """M perturbed copies of a model sharing its weights, each reading them plus its own change (`changes` as
    `members_loss` takes them), run over the same rows: the shared products are computed once for every member's
    rows, and each member adds its low-rank correction. The one forward of both population views, the loss
    (`members_loss`) and generation (`members_generate`)."""

    def __init__(self, model: ZooRnnForCausalLM, changes: dict):
        dtype = model.model.embeddings.weight.dtype  # changes come in at least fp32 (Perturber.members): a bf16 model
        changes = {name: (change[0], *(t.to(dtype) for t in change[1:])) for name, change in changes.items()}
        self.model, self.changes = model, changes
        config = model.config
        self.members = next(iter(changes.values()))[1].shape[0]
        self.embedding_change = changes.get("model.embeddings.weight")
        self.head_change = self.embedding_change if config.tie_word_embeddings else changes.get("lm_head.weight")
        self.layer_changes = by_layer(changes, config.num_hidden_layers)
        # Without a pre-norm the first layer's input projection is linear in the shared embedding: W e once for all
        # members, and W A[ids] B^T = A[ids] (W B)^T per member, r numbers per token; (W B)^T is computed once
        first = model.model.layers[0]
        change = self.embedding_change
        self.shares_projection = first.norm is None and (change is None or change[0] == "lowrank")
        if self.shares_projection:
            projection = first.input_proj.weight
            if change is None:
                self.first_rhs = projection.new_zeros(self.members, 0, projection.shape[0])
            else:
                self.first_rhs = torch.matmul(projection, change[2]).transpose(1, 2)  # [M, r, out]

    def initial_states(self, batch: int) -> list[torch.Tensor]:
        config = self.model.config
        shape = (CELL_SHAPES[config.cell][3], self.members, batch, config.num_heads, config.head_dim)
        return [self.model.model.embeddings.weight.new_zeros(shape) for _ in self.layer_changes]

    def hidden(self, ids: torch.Tensor, states: list[torch.Tensor], skipped: torch.Tensor | None = None):
        """The last layer's output (after the final norm) [M, B, t, H] over ids [B, t] from `states`, which advance
        in place; rows in `skipped` [B] read nothing (padding) and keep their state."""
        model, members = self.model, self.members
        embedded = model.model.embeddings(ids)  # [B, t, E] shared, or [M, B, t, E]: each member's own tokens
        hidden = embedded.expand(members, -1, -1, -1) if ids.dim() == 2 else embedded
        if self.embedding_change is not None:
            hidden = hidden + member_lookup(self.embedding_change, ids)
        shared_input = None
        if self.shares_projection:
            if self.embedding_change is None:
                first_lhs = embedded.new_zeros(members, *ids.shape[-2:], 0)
            else:
                first_lhs = member_rows(self.embedding_change[1], ids)  # [M, B, t, r]
            shared_input = (F.linear(embedded, model.model.layers[0].input_proj.weight), first_lhs, self.first_rhs)
        for i, layer in enumerate(model.model.layers):
            hidden, state = members_layer(
                layer, hidden, self.layer_changes[i], states[i], shared_input if i == 0 else None
            )
            states[i] = state if skipped is None else torch.where(skipped.view(1, 1, -1, 1, 1), states[i], state)
        if model.model.norm_f is not None:
            norm = model.model.norm_f
            scale = member_values(norm.weight, self.changes.get("model.norm_f.weight")).expand(members, -1)
            shift = member_values(norm.bias, self.changes.get("model.norm_f.bias")).expand(members, -1)
            hidden = stacked_layer_norm(hidden, scale, shift, norm.eps)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, B, t, V] from the members' hidden states."""
        head = self.model.lm_head
        logits = F.linear(hidden, head.weight)
        if self.head_change is not None:
            logits = logits + member_linear_change(hidden, self.head_change)
        if head.bias is not None:
            logits = logits + member_values(head.bias, self.changes.get("lm_head.bias"))[:, None, None]
        return logits


def members_loss(
    model: ZooRnnForCausalLM, changes: dict, input_ids: torch.LongTensor, labels: torch.LongTensor
) -> torch.Tensor:
    """Losses of M perturbed copies of this model in one forward over [M x B] sequences, with no copy of the
    weights: every member reads the shared parameters plus its own change. `changes` maps parameter names
    (tied weights once, as `named_parameters()` lists them) to ("lowrank", A [M, *, m, r], B [M, *, n, r]) —
    the member's change of a matrix is A B^T, of a stacked tensor such as the recurrent kernel [G, N, D, D] one
    per block — or ("dense", [M, *shape]); absent parameters are unchanged. The change of an embedding row is
    A[row] B^T, a lookup. Returns [M] losses; member m's equals `forward(input_ids, labels=labels).loss` with
    its parameters, up to floating-point summation order (tested)."""
    view = MemberForward(model, changes)
    states = view.initial_states(input_ids.shape[0])
    loss_dtype = torch.promote_types(model.model.embeddings.weight.dtype, torch.float32)
    loss_sum = states[0].new_zeros(view.members, dtype=loss_dtype)
    scored, steps = 0, input_ids.shape[1]
    for start in range(0, steps, model.config.chunk_size):
        end = min(start + model.config.chunk_size, steps)
        logits = view.logits(view.hidden(input_ids[:, start:end], states))  # [M, B, t, V]
        chunk_sums, chunk_scored = per_model_loss_sums(logits, labels, start, end)
        loss_sum += chunk_sums
        scored += chunk_scored
    return loss_sum / scored


@torch.inference_mode()
def members_generate(
    model: ZooRnnForCausalLM,
    changes: dict,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    pad_token_id: int,
    eos_token_id: int | list[int] | None = None,
    temperature: float | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.LongTensor:
    """Every member's continuation of the same left-padded rows input_ids [B, T] in one batched forward per token:
    [M, B, max_new_tokens]. Greedy, or with `temperature` sampled from softmax(logits / temperature) with member m's
    draws from `generators[m]`. As transformers' `generate` decodes (logits in float32, one multinomial draw per
    row, a row that produced an end token continues with `pad_token_id`), so member m's tokens are those of
    `model.generate` with its parameters and the global generator seeded as `generators[m]` (tested)."""
    view = MemberForward(model, changes)
    members, batch = view.members, input_ids.shape[0]
    states = view.initial_states(batch)
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
    hidden = None
    for low, high, skipped in read_spans(mask, 0, input_ids.shape[1]):  # the prompts, padding skipped
        hidden = view.hidden(input_ids[:, low:high], states, skipped)[:, :, -1:]
    stops = torch.tensor(
        [] if eos_token_id is None else eos_token_id if isinstance(eos_token_id, list) else [eos_token_id],
        dtype=torch.long,
        device=input_ids.device,
    )
    finished = torch.zeros(members, batch, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for position in range(max_new_tokens):
        logits = view.logits(hidden)[:, :, -1].float()  # [M, B, V]
        if temperature is None:
            chosen = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            chosen = torch.stack(
                [torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, generators, strict=True)]
            )
        chosen = chosen.masked_fill(finished, pad_token_id)
        tokens.append(chosen)
        finished |= torch.isin(chosen, stops)
        if position + 1 == max_new_tokens or bool(finished.all()):
            break
        hidden = view.hidden(chosen[:, :, None], states)  # each member reads its own token
    out = torch.full((members, batch, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    out[:, :, : len(tokens)] = torch.stack(tokens, dim=2)
    return out


def members_bytes_per_member(model: ZooRnnForCausalLM, batch_size: int, steps: int) -> int:
    """Rough memory one more member adds to `members_loss`: one time chunk of its activations (no weights)."""
    config = model.config
    input_gates = CELL_SHAPES[config.cell][0]
    per_token = config.embedding_size + config.num_hidden_layers * config.hidden_size * (2 * input_gates + 4)
    per_token += 3 * config.vocab_size
    return batch_size * min(steps, config.chunk_size) * per_token * 4
