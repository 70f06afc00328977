"""Exception classes of selfattn's argument checks.

Each is an instance of the type selfattn documents (ValueError for a bad value
or shape, TypeError for a wrong type or dtype) and of the type torch raises in
the same situation, so code written for torch keeps catching them:
RuntimeError for F.scaled_dot_product_attention's checks, AssertionError for
nn.MultiheadAttention's (and the Transformer layers built on it).
"""
from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentTypeError", "ArgumentAssertionError",
           "ArgumentTypeAssertionError"]


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape (torch: RuntimeError)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (torch: RuntimeError)."""


class ArgumentAssertionError(ArgumentError, AssertionError):
    """A bad value or shape where torch's layers assert (AssertionError)."""


class ArgumentTypeAssertionError(ArgumentTypeError, AssertionError):
    """A wrong type or dtype where torch's layers assert (AssertionError)."""
