"""selfattn: fused self-attention operators for PyTorch.

    selfattn.attention(q, k, v, ...)                    # (B, S, H, D) layout
    selfattn.scaled_dot_product_attention(q, k, v, ...) # torch's SDPA signature
    selfattn.attention_weights(q, k, ...)               # probabilities
    selfattn.reference                                  # plain-PyTorch oracle
    selfattn.nn                                         # drop-in layers
"""
import torch  # noqa: F401

from . import nn, ops, reference
from .functional import attention, attention_weights, scaled_dot_product_attention

__all__ = ["attention", "scaled_dot_product_attention", "attention_weights", "reference", "ops", "nn"]
__version__ = "0.1.0"
