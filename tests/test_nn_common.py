"""Shared helpers of the selfattn.nn tests: run a module forward and backward
with a fixed cotangent, and judge every result with selfattn.testing's
DESIGN.md section 5 check (error against float64 golden at most
max(floor, 2 x the same-dtype reference's)); round-trip a scripted module
through torch.jit.save and load."""
from __future__ import annotations

import copy
import io

import torch

from selfattn.testing import assert_close_to_golden


def clone_as(module: torch.nn.Module, cls=None, dtype=torch.float64) -> torch.nn.Module:
    """A deep copy of `module` in `dtype`, its class switched to `cls` (a
    subclass with the same parameters) when given."""
    m = copy.deepcopy(module).to(dtype)
    if cls is not None:
        m.__class__ = cls
    return m


def forward_backward(fn, inputs, params=(), seed=0):
    """[outputs..., grads of inputs..., grads of params...] of fn(*inputs)
    after a backward of the first output with a random cotangent (same seed,
    same cotangent; further outputs, e.g. attention weights, are compared but
    carry no gradient in selfattn)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
              else t for t in inputs]
    outs = fn(*inputs)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(seed)
    loss = (outs[0] * torch.randn(outs[0].shape, generator=gen, dtype=torch.float64)
            .to(outs[0].dtype)).sum()
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else []
    return [o.detach() for o in outs] + [g for g in grads]


def assert_golden(ours, ref, golden, names=None):
    """selfattn.testing.assert_close_to_golden on each of the lists' entries."""
    assert len(ours) == len(ref) == len(golden)
    for i, (o, r, g) in enumerate(zip(ours, ref, golden)):
        name = names[i] if names else f"result {i}"
        assert (o is None) == (g is None), f"{name}: gradient presence differs"
        if g is not None:
            assert_close_to_golden(name, o, r, g)


def save_load(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """`scripted` after torch.jit.save and torch.jit.load (in memory)."""
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)
