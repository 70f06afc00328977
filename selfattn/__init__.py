"""selfattn: fused self-attention operators for PyTorch.

    selfattn.attention(q, k, v, ...)                    # (B, S, H, D) layout
    selfattn.scaled_dot_product_attention(q, k, v, ...) # torch's SDPA signature
    selfattn.attention_weights(q, k, ...)               # probabilities
    selfattn.varlen_attention(q, k, v, cu_q, cu_k, ...)  # packed variable-length batches
    selfattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=...)  # decoding
    selfattn.reference                                  # plain-PyTorch oracle
    selfattn.nn                                         # drop-in layers
    selfattn.errors                                     # exception classes
    selfattn.enable_sdpa() / disable_sdpa()             # selfattn as torch's SDPA flash kernel
"""
import torch  # noqa: F401

from . import errors, nn, ops, reference, sdpa
from .errors import ArgumentError, ArgumentTypeError
from .functional import attention, attention_weights, scaled_dot_product_attention
from .sdpa import disable_sdpa, enable_sdpa
from .kvcache import attention_with_kvcache
from .varlen import varlen_attention

__all__ = ["attention", "scaled_dot_product_attention", "attention_weights", "reference", "ops",
           "nn", "errors", "sdpa", "ArgumentError", "ArgumentTypeError", "enable_sdpa",
           "disable_sdpa", "varlen_attention", "attention_with_kvcache"]
__version__ = "0.1.0"
