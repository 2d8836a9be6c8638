"""Configuration of ZooRnn: a multi-head LSTM/GRU language model stored in FlashRNN's parameter layout.

This file is also shipped as Hub remote code, so it imports nothing from the rest of hf_zoo_rnn.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

CELLS = ("lstm", "gru")
BACKENDS = ("auto", "torch", "vanilla", "cuda", "cuda_fused", "triton_fused")


@strict
class ZooRnnConfig(PreTrainedConfig):
    r"""
    cell (`str`, defaults to `"lstm"`):
        Recurrent cell, `"lstm"` or `"gru"`.
    vocab_size (`int`, defaults to 100):
        Vocabulary size (100 = Python's `string.printable`, the paper's character vocabulary).
    embedding_size (`int`, defaults to 100):
        Width of the token embedding fed to the first layer.
    num_heads (`int`, defaults to 12) / head_dim (`int`, defaults to 20):
        The recurrence is block-diagonal: `num_heads` independent blocks of `head_dim` units, so the hidden size
        is `num_heads * head_dim` and the recurrent matrix has `gates * num_heads * head_dim**2` entries.
    num_hidden_layers (`int`, defaults to 1):
        Stacked recurrent layers. The paper's model is one layer without norm or residual.
    layer_norm (`bool`, defaults to `False`):
        Pre-norm: a LayerNorm before each layer and before the output projection.
    residual (`bool`, defaults to `False`):
        Add each layer's input to its output (needs `embedding_size == hidden_size`).
    output_bias (`bool`, defaults to `True`):
        Bias on the output projection.
    embedding_init_std / initializer_range (`float`):
        Std of the normal init of the embedding (1.0, like `nn.Embedding`) and of the output projection.
        Input and recurrent matrices use `nn.LSTM`'s uniform(+-1/sqrt(fan_in)) init.
    forget_bias (`float`, defaults to 1.0):
        Initial bias of the gate that keeps memory: the LSTM forget gate, the GRU update gate.
    backend (`str`, defaults to `"auto"`):
        `"torch"` (this file's loop, any device), or a FlashRNN backend: `"vanilla"`, `"cuda"`, `"cuda_fused"`,
        `"triton_fused"`. `"auto"` picks `cuda_fused` (LSTM) / `cuda` (GRU) on CUDA and `"torch"` elsewhere.
    chunk_size (`int`, defaults to 32):
        Time steps per recurrent call; long inputs run chunk by chunk with the state carried, so the memory of a
        forward without gradients does not grow with sequence length.
    """

    model_type = "zoo_rnn"

    cell: str = "lstm"
    vocab_size: int = 100
    embedding_size: int = 100
    num_heads: int = 12
    head_dim: int = 20
    num_hidden_layers: int = 1
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    residual: bool = False
    output_bias: bool = True
    tie_word_embeddings: bool = False
    embedding_init_std: float = 1.0
    initializer_range: float = 0.02
    forget_bias: float = 1.0
    backend: str = "auto"
    chunk_size: int = 32
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def validate_architecture(self):
        """Part of `@strict` validation: every invalid combination names the field at fault."""
        if self.cell not in CELLS:
            raise ValueError(f"ZooRnnConfig.cell must be one of {CELLS}, got {self.cell!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ZooRnnConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("vocab_size", "embedding_size", "num_heads", "head_dim", "num_hidden_layers", "chunk_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"ZooRnnConfig.{name} must be a positive integer, got {value}")
        if self.residual and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"ZooRnnConfig.residual needs embedding_size == hidden_size (num_heads * head_dim), got "
                f"embedding_size={self.embedding_size}, hidden_size={self.hidden_size}"
            )
        if self.tie_word_embeddings and self.embedding_size != self.hidden_size:
            raise ValueError(
                f"ZooRnnConfig.tie_word_embeddings needs embedding_size == hidden_size (num_heads * head_dim), got "
                f"embedding_size={self.embedding_size}, hidden_size={self.hidden_size}"
            )


__all__ = ["ZooRnnConfig"]
