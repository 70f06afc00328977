"""The DESIGN.md section 5 accuracy check, shared by the tests and `python -m selfattn`.

An output or gradient passes when its error against the float64 golden value
is at most max(atol_floor * scale, 2 x the error of the same-dtype reference),
where scale = max(1, max |golden|). NaN never passes.
"""
from __future__ import annotations

import torch

ATOL_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def max_err(x: torch.Tensor, golden: torch.Tensor) -> float:
    return (x.double() - golden.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_golden(name: str, actual: torch.Tensor, lowp_ref: torch.Tensor,
                           golden: torch.Tensor) -> None:
    """actual: the fused result; lowp_ref: the reference in actual's dtype;
    golden: the reference in float64."""
    assert actual.shape == golden.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    scale = max(1.0, golden.abs().max().item()) if golden.numel() else 1.0
    bound = max(ATOL_FLOOR[actual.dtype] * scale, 2.0 * max_err(lowp_ref, golden))
    err = max_err(actual, golden)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (dtype {actual.dtype})"


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, generator=None):
    t = torch.randn(*shape, dtype=torch.float32, generator=generator).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def check_against_reference(fused_fn, ref_fn, inputs, grad_inputs=None, name="attention", *,
                            before_fused=None):
    """Runs fused_fn(*inputs) and ref_fn in the inputs' dtype and in float64,
    compares outputs and the gradients w.r.t. the tensors at grad_inputs
    (indices into inputs; default: every floating tensor that requires grad).
    before_fused, when given, is called right before the fused forward and
    right before the fused backward (e.g. to fill the caching allocator with
    NaN, so that an output element the kernels never wrote shows up)."""
    if grad_inputs is None:
        grad_inputs = [i for i, t in enumerate(inputs)
                       if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(fn, cast):
        xs = [t.detach().to(cast).requires_grad_(t.requires_grad)
              if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        out = fn(*xs)
        return out, xs

    if before_fused is not None:
        before_fused()
    out, xs = run(fused_fn, None)
    ref_lp, xs_lp = run(ref_fn, None)
    gold, xs_64 = run(ref_fn, torch.float64)
    assert_close_to_golden(f"{name} output", out, ref_lp, gold)
    if not grad_inputs:
        return
    dout = torch.randn(out.shape, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    if before_fused is not None:
        before_fused()
    grads = torch.autograd.grad(out, [xs[i] for i in grad_inputs], dout)
    grads_lp = torch.autograd.grad(ref_lp, [xs_lp[i] for i in grad_inputs], dout)
    grads_64 = torch.autograd.grad(gold, [xs_64[i] for i in grad_inputs], dout.double())
    for i, g, g_lp, g_64 in zip(grad_inputs, grads, grads_lp, grads_64):
        assert_close_to_golden(f"{name} grad of input {i}", g, g_lp, g_64)
