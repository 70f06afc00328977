"""Test helpers: the accuracy check lives in selfattn.testing (also used by
`python -m selfattn`); here, the inputs and the check of selfattn.attention
shared by the test files."""
import functools

import torch

import selfattn
from selfattn import reference
from selfattn.testing import (  # noqa: F401
    ATOL_FLOOR,
    assert_close_to_golden,
    check_against_reference,
    max_err,
    rand,
)


def make_qkv(B, Sq, Sk, Hq, Hkv, D, Dv=None, dtype=torch.float32, requires_grad=True):
    """Random q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv)."""
    Dv = D if Dv is None else Dv
    return [rand(B, Sq, Hq, D, dtype=dtype, requires_grad=requires_grad),
            rand(B, Sk, Hkv, D, dtype=dtype, requires_grad=requires_grad),
            rand(B, Sk, Hkv, Dv, dtype=dtype, requires_grad=requires_grad)]


def qkv_maker(**shape):
    """make_qkv with a test file's default shape."""
    return functools.partial(make_qkv, **shape)


def check(inputs, **kw):
    """check_against_reference of attention(q, k, v[, attn_mask], **kw), the
    mask being inputs[3] when present."""
    def fused(q, k, v, *m):
        return selfattn.attention(q, k, v, attn_mask=m[0] if m else None, **kw)

    def ref(q, k, v, *m):
        return reference.attention(q, k, v, attn_mask=m[0] if m else None, **kw)

    check_against_reference(fused, ref, inputs)
