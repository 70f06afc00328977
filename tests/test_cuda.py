"""CUDA backend tests (issue #3); every test needs a GPU and is skipped without one.

Accuracy follows DESIGN.md section 5: the CUDA result's error against the
float64 reference (selfattn.reference, run on the GPU) must be at most
max(atol_floor, 2 x the same-dtype reference's error), for the output and for
every gradient (q, k, v and a float attn_mask). Before each fused run the
caching allocator is filled with NaN, so an output element the kernels never
wrote shows up as NaN, which never passes.

The grid is sparse but covering: S in {1, 63, 128, 1000, 4096}, D in
{16, 32, 64, 80, 128, 256}, float16/bfloat16 (flash kernels) and
float32/float64/odd head dims/unaligned rows (fallback kernels), crossed with
Sq != Sk, both causal alignments, windows, GQA/MQA, D != Dv, key_lengths and
masks. Then dropout, strides, consistency with the CPU backend, opcheck,
torch.compile, CUDA graphs and deterministic mode.
"""
from __future__ import annotations

import pytest
import torch

import selfattn
from selfattn import ops, reference

from helpers import check_against_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DT = {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}
DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def poison_allocator():
    """Fills cached blocks of several sizes with NaN and frees them, so that
    the fused ops' torch.empty outputs start as NaN."""
    blocks = [torch.full((n,), float("nan"), device=DEV)
              for n in [1 << 10] * 64 + [1 << 18] * 16 + [1 << 22] * 4 + [1 << 26]]
    del blocks
    torch.cuda.synchronize()


def randn(*shape, dtype=F32, requires_grad=False):
    return torch.randn(*shape, device=DEV).to(dtype).requires_grad_(requires_grad)


def check(fused_fn, ref_fn, inputs, name="attention"):
    """selfattn.testing.check_against_reference with the allocator poisoned
    before the fused forward and before the fused backward."""
    check_against_reference(fused_fn, ref_fn, inputs, name=name, before_fused=poison_allocator)


def case(B=1, Sq=63, Sk=None, Hq=2, Hkv=None, D=64, Dv=None, dtype=BF16, causal=False,
         align="bottom_right", window=None):
    Sk = Sq if Sk is None else Sk
    Hkv = Hq if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    c = dict(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, dtype=dtype, causal=causal,
             align=align, window=window)
    ident = (f"B{B}-Sq{Sq}-Sk{Sk}-H{Hq}x{Hkv}-D{D}" + (f"-Dv{Dv}" if Dv != D else "")
             + f"-{DT[dtype]}" + (f"-causal_{'br' if align == 'bottom_right' else 'tl'}"
                                  if causal else "")
             + (f"-w{window[0]}_{window[1]}" if window is not None else ""))
    return pytest.param(c, id=ident)


GRID = [
    # flash kernels: every S and D, both dtypes
    case(Sq=1, D=16, dtype=F16),
    case(Sq=1, D=256, dtype=BF16, B=2),
    case(Sq=63, D=32, dtype=BF16),
    case(Sq=63, D=80, dtype=F16, B=3),
    case(Sq=128, D=64, dtype=F16),
    case(Sq=128, D=128, dtype=BF16),
    case(Sq=128, D=256, dtype=F16),
    case(Sq=1000, D=64, dtype=BF16),
    case(Sq=1000, D=80, dtype=BF16, Hq=1),
    case(Sq=1000, D=256, dtype=BF16, Hq=1),
    case(Sq=4096, D=128, dtype=F16, Hq=1),
    case(Sq=4096, D=64, dtype=BF16, Hq=1, causal=True),
    # Sq != Sk, causal in both alignments, Sq <, > Sk
    case(Sq=63, Sk=1000, D=64, dtype=F16, causal=True),
    case(Sq=63, Sk=1000, D=128, dtype=BF16, causal=True, align="top_left"),
    case(Sq=1000, Sk=63, D=32, dtype=F16, causal=True),
    case(Sq=1000, Sk=128, D=64, dtype=BF16, causal=True, align="top_left"),
    case(Sq=1, Sk=1000, D=128, dtype=F16, causal=True),
    # decoding a long cache: split-KV (few CTAs, many key tiles)
    case(Sq=1, Sk=8192, D=128, Hq=32, Hkv=8, dtype=BF16, causal=True),
    case(Sq=128, D=16, dtype=BF16, causal=True, align="top_left"),
    # windows
    case(Sq=1000, D=64, dtype=BF16, window=(100, 0)),
    case(Sq=1000, D=128, dtype=F16, window=(17, 33)),
    case(Sq=128, Sk=1000, D=32, dtype=BF16, window=(-1, 5)),
    case(Sq=1000, Sk=128, D=256, dtype=F16, window=(3, -1), causal=False, B=1, Hq=1),
    # GQA / MQA, D != Dv
    case(Sq=128, D=64, Hq=8, Hkv=2, dtype=BF16),
    case(Sq=1000, D=128, Hq=4, Hkv=1, dtype=F16, causal=True),
    case(Sq=63, D=64, Dv=128, dtype=BF16),
    case(Sq=128, D=256, Dv=32, Hq=4, Hkv=2, dtype=F16, causal=True),
    case(Sq=63, D=80, Dv=16, dtype=BF16, window=(10, 10)),
    # fallback kernels: float32, float64, head dims not a multiple of 8 or above 256
    case(Sq=63, D=64, dtype=F32),
    case(Sq=128, D=32, dtype=F32, Hq=4, Hkv=2, causal=True),
    case(Sq=1000, D=16, dtype=F32, Hq=1, window=(50, 50)),
    case(Sq=63, Sk=128, D=80, dtype=F64, causal=True, align="top_left"),
    case(Sq=63, D=20, dtype=F16),
    case(Sq=128, D=36, Dv=12, dtype=BF16, causal=True),
    case(Sq=63, D=320, dtype=BF16, Hq=1),
    case(Sq=63, D=512, dtype=F32, Hq=1),
]


def _qkv(c, requires_grad=True):
    dt = c["dtype"]
    return (randn(c["B"], c["Sq"], c["Hq"], c["D"], dtype=dt, requires_grad=requires_grad),
            randn(c["B"], c["Sk"], c["Hkv"], c["D"], dtype=dt, requires_grad=requires_grad),
            randn(c["B"], c["Sk"], c["Hkv"], c["Dv"], dtype=dt, requires_grad=requires_grad))


def _kw(c):
    return dict(causal=c["causal"], causal_alignment=c["align"], window=c["window"])


@pytest.mark.parametrize("c", GRID)
def test_forward_and_gradients(c):
    kw = _kw(c)
    check(lambda q, k, v: selfattn.attention(q, k, v, **kw),
          lambda q, k, v: reference.attention(q, k, v, **kw), list(_qkv(c)))


@pytest.mark.parametrize("c", GRID[::4])
def test_lse(c):
    kw = _kw(c)
    q, k, v = _qkv(c, requires_grad=False)
    poison_allocator()
    out, lse = selfattn.attention(q, k, v, return_lse=True, **kw)
    _, lse_64 = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert lse.dtype == (F64 if c["dtype"] == F64 else F32)
    dead = torch.isinf(lse_64)
    assert torch.equal(torch.isinf(lse), dead) and (lse[dead] == float("-inf")).all()
    torch.testing.assert_close(lse[~dead].double(), lse_64[~dead], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=DT.get)
def test_key_lengths(dtype):
    B, S = 4, 200
    q, k, v = (randn(B, S, 2, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    # 0 (every row dead), in range, S, and out-of-range values, which CUDA clamps to [0, S]
    kl = torch.tensor([0, 77, S, S + 50], device=DEV)
    kl_clamped = kl.clamp(0, S)
    check(lambda q, k, v: selfattn.attention(q, k, v, key_lengths=kl, causal=True),
          lambda q, k, v: reference.attention(q, k, v, key_lengths=kl_clamped, causal=True),
          [q, k, v])
    kl_neg = torch.tensor([-5, 3, 64, 1], device=DEV)
    check(lambda q, k, v: selfattn.attention(q, k, v, key_lengths=kl_neg),
          lambda q, k, v: reference.attention(q, k, v, key_lengths=kl_neg.clamp(0, S)),
          [q, k, v])


MASK_SHAPES = [(1000, 1000), (2, 1, 1000, 1000), (1, 4, 1, 1000), (1000,), (2, 4, 1000, 1000)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT.get)
def test_bool_mask(shape, dtype):
    q, k, v = (randn(2, 1000, 4, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.rand(shape, device=DEV) > 0.3
    check(lambda q, k, v: selfattn.attention(q, k, v, attn_mask=mask, causal=True),
          lambda q, k, v: reference.attention(q, k, v, attn_mask=mask, causal=True), [q, k, v])


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F16, F32], ids=DT.get)
def test_float_mask_and_its_gradient(shape, dtype):
    q, k, v = (randn(2, 1000, 4, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = randn(*shape, dtype=dtype, requires_grad=True)
    check(lambda q, k, v, m: selfattn.attention(q, k, v, attn_mask=m, window=(300, 20)),
          lambda q, k, v, m: reference.attention(q, k, v, attn_mask=m, window=(300, 20)),
          [q, k, v, mask])


def test_mask_with_minus_inf_and_dead_rows():
    q, k, v = (randn(1, 130, 2, 64, dtype=BF16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(130, 130, device=DEV, dtype=BF16)
    mask[5] = float("-inf")  # row 5 sees nothing
    mask[:, 7] = float("-inf")
    out, lse = selfattn.attention(q, k, v, attn_mask=mask, return_lse=True)
    out.sum().backward()
    assert (out[0, 5] == 0).all() and (lse[0, :, 5] == float("-inf")).all()
    assert (q.grad[0, 5] == 0).all() and not torch.isnan(q.grad).any()
    assert not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=DT.get)
def test_fully_masked_rows_give_zero_not_nan(dtype):
    # bottom-right causal with Sq > Sk: the first Sq - Sk rows see nothing
    q = randn(2, 300, 2, 64, dtype=dtype, requires_grad=True)
    k, v = (randn(2, 100, 2, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    poison_allocator()
    out, lse = selfattn.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out[:, :200] == 0).all() and (lse[:, :, :200] == float("-inf")).all()
    assert (dq[:, :200] == 0).all()
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


# ---- dropout


def _rng(seed=1234, offset=8):
    return torch.tensor([seed, offset], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=DT.get)
@pytest.mark.parametrize("D", [64, 256, 20])
def test_dropout_matches_reference_with_the_drawn_mask(dtype, D):
    B, S, Hq, Hkv, p = 2, 200, 4, 2, 0.3
    q = randn(B, S, Hq, D, dtype=dtype, requires_grad=True)
    k, v = (randn(B, S, Hkv, D, dtype=dtype, requires_grad=True) for _ in range(2))
    rng = _rng().to(DEV)
    scale = D ** -0.5
    # mask, key_lengths, rng, scale, window, diag_offset, p, alibi, softcap, q/k starts
    args = (None, None, rng, scale, 40, 0, 0, p, None, 0.0, 0, 0)
    probs = ops.probs_op(q.detach(), k.detach(), None, *args)
    visible = reference.attention_weights(q.detach().double(), k.detach().double(),
                                          window=(40, 0)) > 0
    keep = probs != 0
    rate = keep[visible].float().mean().item()
    assert abs(rate - (1 - p)) < 0.01, f"keep rate {rate}"
    check(lambda q, k, v: ops.forward_op(q, k, v, *args)[0],
          lambda q, k, v: reference.attention(q, k, v, window=(40, 0), dropout_p=p,
                                              dropout_mask=keep),
          [q, k, v], name="dropout attention")


def test_dropout_same_seed_same_result():
    q, k, v = (randn(1, 300, 2, 64, dtype=BF16, requires_grad=True) for _ in range(3))

    def run(seed):
        g = torch.Generator(device=DEV).manual_seed(seed)
        out = selfattn.attention(q, k, v, dropout_p=0.2, generator=g)
        return (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a[:1] + a[2:], b[:1] + b[2:]):  # dq uses atomics: compare the rest exactly
        assert torch.equal(x, y)
    torch.testing.assert_close(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT.get)
def test_dropout_mask_is_bitwise_the_cpu_mask(dtype):
    q, k = randn(2, 130, 4, 32, dtype=dtype), randn(2, 130, 2, 32, dtype=dtype)
    args = (None, None, None, 32 ** -0.5, -1, -1, 0, 0.4, None, 0.0, 0, 0)

    def keep(device):
        rng = _rng(99, 12).to(device)
        probs = ops.probs_op(q.to(device), k.to(device), None, None, None, rng, *args[3:])
        return (probs != 0).cpu()

    assert torch.equal(keep("cpu"), keep(DEV))


# ---- layouts, backends, tooling


@pytest.mark.parametrize("dtype", [BF16, F16], ids=DT.get)
def test_odd_strides(dtype):
    B, S, H, D = 2, 150, 4, 64
    # (B, H, S, D) storage seen as (B, S, H, D): aligned, non-contiguous -> flash kernels
    q = randn(B, H, S, D, dtype=dtype).transpose(1, 2).requires_grad_()
    # rows 3 elements apart from an oversized buffer: unaligned -> fallback kernels
    k = randn(B, S, H, D + 3, dtype=dtype)[..., :D].requires_grad_()
    # packed qkv-style buffer: row stride 3 * H * D, aligned
    v = randn(B, S, 3, H, D, dtype=dtype)[:, :, 1].requires_grad_()
    check(lambda q, k, v: selfattn.attention(q, k, v, causal=True),
          lambda q, k, v: reference.attention(q, k, v, causal=True), [q, k, v])
    ka = k.detach().contiguous().requires_grad_()
    check(lambda q, k, v: selfattn.attention(q, k, v, window=(30, 30)),
          lambda q, k, v: reference.attention(q, k, v, window=(30, 30)), [q, ka, v])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT.get)
def test_cpu_and_cuda_agree(dtype):
    q, k, v = (torch.randn(2, 97, 4, 64).to(dtype) for _ in range(3))
    mask = torch.rand(97, 97) > 0.2
    kw = dict(causal=True, window=(50, 0), attn_mask=mask)
    outs = {}
    for dev in ("cpu", DEV):
        xs = [t.to(dev).requires_grad_() for t in (q, k, v)]
        out, lse = selfattn.attention(*xs, return_lse=True, **{**kw, "attn_mask": mask.to(dev)})
        grads = torch.autograd.grad(out, xs, torch.ones_like(out))
        outs[dev] = [t.cpu().float() for t in (out, lse) + grads]
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == F32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(outs["cpu"], outs[DEV]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [F16, F32], ids=DT.get)
def test_probs_match_reference(dtype):
    q, k = randn(2, 70, 4, 40, dtype=dtype), randn(2, 90, 2, 40, dtype=dtype)
    mask = torch.rand(70, 90, device=DEV) > 0.2
    kw = dict(causal=True, attn_mask=mask)
    poison_allocator()
    w = selfattn.attention_weights(q, k, **kw)
    _, lse = selfattn.attention(q, k, k, return_lse=True, **kw)
    w_lse = selfattn.attention_weights(q, k, lse=lse, **kw)
    ref = reference.attention_weights(q.double(), k.double(), **kw)
    tol = 2e-3 if dtype == F16 else 1e-5
    torch.testing.assert_close(w.double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(w_lse.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT.get)
def test_opcheck(dtype):
    q, k, v = (randn(2, 33, 4, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = randn(33, 33, dtype=dtype, requires_grad=True)
    fwd_args = (q, k, v, mask, None, None, 0.125, -1, 0, 0, 0.0, None, 0.0, 0, 0)
    torch.library.opcheck(ops.forward_op, fwd_args)
    out, lse = ops.forward_op(*fwd_args)
    torch.library.opcheck(ops.backward_op, (torch.randn_like(out), q.detach(), k.detach(),
                                            v.detach(), out.detach(), lse, mask.detach(), None,
                                            None, 0.125, -1, 0, 0, 0.0, None, 0.0, 0, 0,
                                            True))
    torch.library.opcheck(ops.probs_op, (q.detach(), k.detach(), None, None, None, None, 0.125,
                                         -1, 0, 0, 0.0, None, 0.0, 0, 0))


def test_torch_compile_fullgraph():
    q, k, v = (randn(2, 200, 4, 64, dtype=BF16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    ge = torch.autograd.grad(f(q, k, v), (q, k, v))
    gc = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cuda_graph_capture_forward_backward(dropout_p):
    q, k, v = (randn(2, 256, 4, 64, dtype=F16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 256, 4, 64, device=DEV, dtype=F16)

    def step():
        out = selfattn.attention(q, k, v, causal=True, dropout_p=dropout_p)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    first = [t.clone() for t in static]
    graph.replay()
    second = [t.clone() for t in static]
    for t in first + second:
        assert not torch.isnan(t).any()
    if dropout_p == 0.0:
        eager = step()
        torch.testing.assert_close(first[0], eager[0])
        for a, b in zip(first[1:], eager[1:]):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    else:
        assert not torch.equal(first[0], second[0]), "each replay draws a new dropout mask"


@pytest.mark.parametrize("dtype", [BF16, F32], ids=DT.get)
def test_deterministic_mode_gives_bitwise_identical_gradients(dtype):
    q = randn(2, 500, 8, 128, dtype=dtype, requires_grad=True)
    k, v = (randn(2, 500, 2, 128, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 500, 8, 128, device=DEV).to(dtype)

    def grads():
        out = selfattn.attention(q, k, v, causal=True, dropout_p=0.1,
                                 generator=torch.Generator(device=DEV).manual_seed(3))
        return torch.autograd.grad(out, (q, k, v), dout)

    nondeterministic = grads()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z in zip(a, b, nondeterministic):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, atol=2e-2, rtol=2e-2)


def test_deterministic_mode_refuses_summed_mask_gradient():
    q, k, v = (randn(1, 64, 2, 64, dtype=BF16, requires_grad=True) for _ in range(3))
    mask = randn(64, 64, dtype=BF16, requires_grad=True)  # broadcast over B and heads
    out = selfattn.attention(q, k, v, attn_mask=mask)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            torch.autograd.grad(out, mask, torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_device_of_the_data():
    q, k, v = (torch.randn(1, 100, 2, 64, device="cuda:1", dtype=BF16, requires_grad=True)
               for _ in range(3))
    with torch.cuda.device(0):
        out = selfattn.attention(q, k, v, causal=True)
        out.sum().backward()
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert out.device == q.device and q.grad.device == q.device
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------
# selfattn as torch's SDPA flash kernel on CUDA (selfattn/sdpa.py, issue 15)

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_flash_override(dtype, causal):
    """Unmodified F.scaled_dot_product_attention under
    sdpa_kernel(FLASH_ATTENTION) runs selfattn's op while it is active and
    matches the float64 math within the bound, forward and gradients, and
    under torch.compile(fullgraph=True)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from selfattn.testing import assert_close_to_golden

    q, k, v, dout = (torch.randn(2, 4, 256, 64, device="cuda", dtype=dtype) for _ in range(4))

    def run(fn, dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        return [out.detach()] + list(torch.autograd.grad(out, xs, dout.to(dt)))

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    golden = run(sdpa, torch.float64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        lowp = run(sdpa, dtype)  # torch's own flash kernel: the same-dtype reference
        selfattn.enable_sdpa()
        try:
            with torch.profiler.profile() as prof:
                ours = run(sdpa, dtype)
            compiled = run(torch.compile(sdpa, fullgraph=True), dtype)
        finally:
            selfattn.disable_sdpa()
    names = {e.name for e in prof.events()}
    assert {"selfattn::attention_forward", "selfattn::attention_backward"} <= names
    for result in (ours, compiled):
        for name, o, lp, g in zip(("out", "dq", "dk", "dv"), result, lowp, golden):
            assert_close_to_golden(f"sdpa override {name}", o, lp, g)
