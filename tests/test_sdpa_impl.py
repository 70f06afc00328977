"""selfattn as torch's own SDPA flash implementation (selfattn/sdpa.py) on CPU:
with "selfattn" activated in torch.nn.attention's registry, unmodified calls
of F.scaled_dot_product_attention that torch routes to its CPU flash kernel
run selfattn's ops (seen in the profiler), match the float64 math of torch's
SDPA within DESIGN.md's bound (torch's own kernel being the same-dtype
reference), keep torch's output layouts, work under torch.compile, autocast
and sdpa_kernel(FLASH_ATTENTION); restore returns to torch's kernel; models
that call SDPA (torch's MultiheadAttention and encoder layer, a Hugging Face
model with attn_implementation="sdpa") give the same results either way.
CUDA: the overrides of torch's CUDA flash ops are registered and removed
with the CPU ones (their values run under the emulator:
tests/simt/test_simt_sdpa.py), and their refusals name the argument.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import selfattn
from selfattn.testing import assert_close_to_golden, rand

registry = pytest.mark.skipif(not hasattr(torch.nn.attention, "activate_flash_attention_impl"),
                              reason="this torch has no flash-attention registry")


@pytest.fixture
def active():
    selfattn.enable_sdpa()
    yield
    selfattn.disable_sdpa()


def _selfattn_ops(fn):
    """The selfattn ops the profiler saw while fn() ran, and fn's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return {e.name for e in prof.events() if e.name.startswith("selfattn::")}, result


def _forward_backward(q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), dout))


def _golden(q, k, v, dout, **kw):
    """torch's math in float64 (a float mask cast too)."""
    kw = {n: (m.double() if isinstance(m, torch.Tensor) and m.is_floating_point() else m)
          for n, m in kw.items()}
    with sdpa_kernel(SDPBackend.MATH):
        return _forward_backward(q.double(), k.double(), v.double(), dout.double(), **kw)


def test_registered_not_active_on_import():
    if hasattr(torch.nn.attention, "list_flash_attention_impls"):
        assert "selfattn" in torch.nn.attention.list_flash_attention_impls()
        assert torch.nn.attention.current_flash_attention_impl() != "selfattn"
    seen, _ = _selfattn_ops(lambda: F.scaled_dot_product_attention(*[rand(1, 2, 8, 16)] * 3))
    assert not seen


B, HQ, HKV, L, S, D = 2, 4, 2, 37, 53, 32
MASKS = {
    "none": lambda: None,
    "bool_2d": lambda: torch.rand(L, S) < 0.7,
    "float_2d": lambda: torch.randn(L, S),
    "bool_4d_per_batch": lambda: torch.rand(B, 1, L, S) < 0.7,
    "float_4d_full": lambda: torch.randn(B, HQ, L, S),
    "bool_4d_heads": lambda: torch.rand(1, HQ, L, S) < 0.7,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", MASKS.keys())
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_torch_within_the_bound(active, dtype, mask, gqa):
    torch.manual_seed(0)
    hkv = HKV if gqa else HQ
    q, k, v = rand(B, HQ, L, D, dtype=dtype), rand(B, hkv, S, D, dtype=dtype), \
        rand(B, hkv, S, D, dtype=dtype)
    dout = rand(B, HQ, L, D, dtype=dtype)
    m = MASKS[mask]()
    kw = dict(attn_mask=None if m is None else (m if m.dtype == torch.bool else m.to(dtype)),
              enable_gqa=gqa)
    seen, ours = _selfattn_ops(lambda: _forward_backward(q, k, v, dout, **kw))
    assert seen == {"selfattn::attention_forward", "selfattn::attention_backward"}
    selfattn.disable_sdpa()
    theirs = _forward_backward(q, k, v, dout, **kw)
    golden = _golden(q, k, v, dout, **kw)
    for name, o, t, g in zip(("out", "dq", "dk", "dv"), ours, theirs, golden):
        assert_close_to_golden(name, o, t, g)


@pytest.mark.parametrize("causal,scale", [(True, None), (False, 0.3), (True, 2.0)])
def test_causal_and_scale(active, causal, scale):
    q, k, v, dout = (rand(2, 3, 40, 16) for _ in range(4))
    kw = dict(is_causal=causal, scale=scale)
    seen, ours = _selfattn_ops(lambda: _forward_backward(q, k, v, dout, **kw))
    assert "selfattn::attention_forward" in seen
    selfattn.disable_sdpa()
    for name, o, t, g in zip(("out", "dq", "dk", "dv"), ours, _forward_backward(q, k, v, dout, **kw),
                             _golden(q, k, v, dout, **kw)):
        assert_close_to_golden(name, o, t, g)


@pytest.mark.parametrize("transposed", [False, True])
def test_output_layouts_are_torchs(transposed):
    """Output like empty_like(query), lse (B, H, L) over (B, L, H) memory,
    gradients over (B, S, H, D) memory: what torch's kernel and its fake
    kernel give."""
    q, k, v = (rand(2, 9, 3, 16).transpose(1, 2) if transposed else rand(2, 3, 9, 16)
               for _ in range(3))
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    layouts = []
    for enable in (False, True):
        if enable:
            selfattn.enable_sdpa()
        try:
            out, lse = op(q, k, v)
            grads = bwd(torch.randn_like(out), q, k, v, out, lse, 0.0, False)
            layouts.append([(t.shape, t.stride(), t.dtype) for t in (out, lse, *grads)])
        finally:
            selfattn.disable_sdpa()
    assert layouts[0] == layouts[1]


def test_restore_returns_to_torchs_kernel():
    q = rand(1, 2, 8, 16)
    selfattn.enable_sdpa()
    seen, _ = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert seen == {"selfattn::attention_forward"}
    selfattn.disable_sdpa()
    seen, _ = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert not seen


@registry
def test_torchs_registry_calls():
    q = rand(1, 2, 8, 16)
    torch.nn.attention.activate_flash_attention_impl("selfattn")
    try:
        assert torch.nn.attention.current_flash_attention_impl() == "selfattn"
        seen, _ = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q))
        assert seen == {"selfattn::attention_forward"}
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    assert torch.nn.attention.current_flash_attention_impl() is None
    seen, _ = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert not seen


def test_what_selfattn_does_not_take_runs_torchs_kernel(active):
    """Head dims above 512 go to torch's own kernel; dropout never reaches
    the flash kernel on CPU (torch runs its math there), and the same seed
    still gives the same result."""
    q = rand(1, 2, 6, 600)
    seen, out = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert not seen
    selfattn.disable_sdpa()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), rtol=0, atol=0)
    selfattn.enable_sdpa()
    q = rand(1, 2, 6, 16)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        results.append(F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    assert torch.equal(*results)


def _cuda_kernel_source(op):
    """Where the CUDA kernel torch dispatches aten::`op` to was registered."""
    line = next(ln for ln in torch._C._dispatch_dump(f"aten::{op}").splitlines()
                if ln.startswith("CUDA:"))
    return line.split("registered at ", 1)[1]


@pytest.mark.skipif(not (torch.version.cuda and selfattn.sdpa._has_cuda_backend()),
                    reason="selfattn built without its CUDA backend")
def test_cuda_flash_ops_overridden_and_restored():
    """The CUDA flash ops point at selfattn's closures while active and at
    torch's kernels after (their values run under the emulator: tests/simt)."""
    names = ("_flash_attention_forward", "_flash_attention_backward",
             "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_backward")
    before = {n: _cuda_kernel_source(n) for n in names}
    assert not any("selfattn" in src for src in before.values())
    selfattn.enable_sdpa()
    try:
        assert all("selfattn/sdpa.py" in _cuda_kernel_source(n) for n in names)
    finally:
        selfattn.disable_sdpa()
    assert {n: _cuda_kernel_source(n) for n in names} == before


def test_cuda_refusals_name_the_argument():
    q = torch.empty(1, 4, 2, 16, dtype=torch.float16)
    assert selfattn.sdpa.cuda_refusal(q, q, q) is None
    assert selfattn.sdpa.cuda_refusal(q, q, q, num_splits=0) is None  # torch's "choose"
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    for kw, words in ((dict(cum_seq_q=offsets, cum_seq_k=offsets), "cum_seq_q"),
                      (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
                      (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
                      (dict(seqused_k=torch.tensor([3], dtype=torch.int32)), "seqused_k"),
                      (dict(return_debug_mask=True), "return_debug_mask"),
                      (dict(num_splits=1), "num_splits")):
        assert words in selfattn.sdpa.cuda_refusal(q, q, q, **kw)
    wide = torch.empty(1, 4, 2, 600, dtype=torch.float16)
    assert "head dims" in selfattn.sdpa.cuda_refusal(wide, wide, wide)


def test_cuda_dropout_with_forward_only_arguments_raises():
    """With dropout, the CUDA backward override is selfattn's whoever ran the
    forward: arguments that would send only the forward to torch are refused
    (torch's dropout mask could not be redrawn), num_splits is ignored, and
    packed batches (whose backward goes to torch too) still go to torch."""
    q = torch.empty(1, 4, 2, 16, dtype=torch.float16)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    for kw, words in ((dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
                      (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
                      (dict(seqused_k=torch.tensor([3], dtype=torch.int32)), "seqused_k"),
                      (dict(return_debug_mask=True), "return_debug_mask")):
        with pytest.raises(NotImplementedError, match=f"dropout_p > 0 with {words}"):
            selfattn.sdpa.cuda_refusal(q, q, q, dropout_p=0.1, **kw)
        assert selfattn.sdpa.cuda_refusal(q, q, q, dropout_p=0.0, **kw) is not None
    assert selfattn.sdpa.cuda_refusal(q, q, q, num_splits=2, dropout_p=0.1) is None
    assert "cum_seq_q" in selfattn.sdpa.cuda_refusal(
        q, q, q, offsets, offsets, return_debug_mask=True, dropout_p=0.1)


def test_row_that_sees_no_key_gives_zero_as_torch(active):
    q = rand(1, 2, 4, 16)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False
    seen, out = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=keep))
    assert seen and torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_a_model_using_sdpa(active, backend):
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    torch.manual_seed(0)
    model = Attn()
    x = torch.randn(2, 24, 32)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    seen, loss = _selfattn_ops(lambda: compiled(x))
    assert "selfattn::attention_forward" in seen
    grads = torch.autograd.grad(loss, list(model.parameters()))
    selfattn.disable_sdpa()
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_autocast_and_sdpa_kernel_flash(active):
    q, k, v = (rand(2, 4, 16, 32) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        seen, out = _selfattn_ops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert seen == {"selfattn::attention_forward"} and out.dtype == torch.bfloat16
    expected = selfattn.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                     is_causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_layers_unchanged(active):
    """torch's MultiheadAttention (training and its eval fast path) and
    encoder layer give the same results with selfattn active as without."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 10, 32, dtype=torch.float64).float()
    pad = torch.arange(10) >= torch.tensor([[10], [7]])
    calls = [lambda: mha(x, x, x, need_weights=False)[0],
             lambda: mha(x, x, x, key_padding_mask=pad, need_weights=False)[0],
             lambda: layer(x, src_key_padding_mask=pad)]
    results = {}
    for enabled in (True, False):
        if not enabled:
            selfattn.disable_sdpa()
        for train in (True, False):
            mha.train(train)
            layer.train(train)
            with torch.set_grad_enabled(train):
                results[enabled, train] = [c().detach() for c in calls]
    for train in (True, False):
        for a, b in zip(results[True, train], results[False, train]):
            torch.testing.assert_close(a[~pad] if a.shape[:2] == pad.shape else a,
                                       b[~pad] if b.shape[:2] == pad.shape else b,
                                       rtol=1e-5, atol=1e-5)


def test_hugging_face_sdpa_model_unchanged(active):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    seen, ours = _selfattn_ops(lambda: model(input_ids=ids).logits.detach())
    assert "selfattn::attention_forward" in seen
    ours_padded = model(input_ids=ids, attention_mask=mask).logits.detach()
    selfattn.disable_sdpa()
    theirs = model(input_ids=ids).logits.detach()
    theirs_padded = model(input_ids=ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    keep = mask.bool()
    torch.testing.assert_close(ours_padded[keep], theirs_padded[keep], rtol=1e-4, atol=1e-4)
