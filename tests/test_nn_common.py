"""Shared helpers of the selfattn.nn tests: run a module forward and backward
with a fixed cotangent, and judge results the DESIGN.md section 5 way (error
against float64 golden at most max(floor, 2 x the same-dtype reference's))."""
from __future__ import annotations

import copy

import torch

FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}


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


def assert_golden(ours, ref, golden, dtype, names=None):
    """Each of `ours` within max(floor, 2 x error of `ref`) of `golden`."""
    assert len(ours) == len(ref) == len(golden)
    for i, (o, r, g) in enumerate(zip(ours, ref, golden)):
        name = names[i] if names else f"result {i}"
        if g is None:
            assert o is None or not o.abs().any(), f"{name}: expected no gradient"
            continue
        assert o is not None, f"{name}: missing"
        assert o.shape == g.shape, f"{name}: shape {tuple(o.shape)} != {tuple(g.shape)}"
        assert not torch.isnan(o).any(), f"{name}: NaN"
        err = (o.double() - g.double()).abs().max().item() if o.numel() else 0.0
        ref_err = (r.double() - g.double()).abs().max().item() if r.numel() else 0.0
        bound = max(FLOOR[dtype] * max(1.0, g.abs().max().item() if g.numel() else 1.0), 2 * ref_err)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference {ref_err:.3g})"
