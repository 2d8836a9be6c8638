"""Weight conversion from torch.nn.LSTM / torch.nn.GRU into ZooRnn's FlashRNN layout (single head)."""

import torch
from torch import nn

from .modeling_zoo_rnn import ZooRnnPreTrainedModel


@torch.no_grad()
def load_torch_rnn_weights(model: ZooRnnPreTrainedModel, rnn: nn.LSTM | nn.GRU) -> None:
    """Copy every layer of `rnn` into the recurrent layers of `model` (a ZooRnnModel or ZooRnnForCausalLM).

    The model must have one head (head_dim == rnn.hidden_size), as many layers as `rnn`, no norm and no residual.
    LSTM gates (i, f, g, o) map one to one and b = b_ih + b_hh. GRU: R takes the hidden rows in FlashRNN's
    order (n, r, z) and b = (b_hn, b_ir + b_hr, b_iz + b_hz, b_in).
    """
    config = model.config
    expected = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(type(rnn))
    problems = []
    if expected != config.cell:
        problems.append(f"rnn is {type(rnn).__name__} but config.cell is {config.cell!r}")
    if config.num_heads != 1 or config.head_dim != rnn.hidden_size:
        problems.append(
            f"config needs num_heads=1 and head_dim={rnn.hidden_size} (got {config.num_heads}, {config.head_dim})"
        )
    if rnn.num_layers != config.num_hidden_layers:
        problems.append(f"rnn has {rnn.num_layers} layers, config.num_hidden_layers is {config.num_hidden_layers}")
    if rnn.input_size != config.embedding_size:
        problems.append(f"rnn.input_size {rnn.input_size} != config.embedding_size {config.embedding_size}")
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        problems.append("bidirectional RNNs and LSTM proj_size are not supported")
    if config.layer_norm or config.residual:
        problems.append("config.layer_norm and config.residual must be False (nn.LSTM/GRU have neither)")
    if problems:
        raise ValueError("cannot convert: " + "; ".join(problems))

    layers = model.model.layers if hasattr(model, "model") else model.layers
    hidden = rnn.hidden_size
    for index, layer in enumerate(layers):
        w_ih = getattr(rnn, f"weight_ih_l{index}")
        w_hh = getattr(rnn, f"weight_hh_l{index}").view(-1, hidden, hidden)  # [gates, H, H]
        zeros = torch.zeros(w_ih.shape[0], dtype=w_ih.dtype, device=w_ih.device)
        b_ih = getattr(rnn, f"bias_ih_l{index}") if rnn.bias else zeros
        b_hh = getattr(rnn, f"bias_hh_l{index}") if rnn.bias else zeros
        layer.input_proj.weight.copy_(w_ih)
        if config.cell == "lstm":
            layer.recurrent_kernel.copy_(w_hh[:, None])
            layer.bias.copy_((b_ih + b_hh).view(4, 1, hidden))
        else:
            (b_ir, b_iz, b_in), (b_hr, b_hz, b_hn) = b_ih.view(3, hidden), b_hh.view(3, hidden)
            layer.recurrent_kernel.copy_(w_hh[[2, 0, 1], None])
            layer.bias.copy_(torch.stack((b_hn, b_ir + b_hr, b_iz + b_hz, b_in)).view(4, 1, hidden))
