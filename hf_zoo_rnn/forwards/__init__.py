"""Training views of the model: forwards the optimisers need and the shipped inference model does not carry
(population losses for zero-order probes, the one-step and readout views for local gradients)."""

from .next_token import next_token_losses

__all__ = ["next_token_losses"]
