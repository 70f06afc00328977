"""selfattn.nn's Transformer layers as drop-ins for torch's, under
torch.jit.script as PyTorch's own transformer tests use them: the encoder and
decoder layers, the encoder and decoder stacks and a subclass of each script,
their scripted forward equals the eager one (training with dropout under the
same seed, and eval under no_grad, as torch's
test_transformerencoderlayer_subclass), keeps the fused op in its graph, and
survives torch.jit.save / load; the scripted layers match torch's layers with
the same weights (DESIGN.md section 5 bound, float64 golden), with padding,
causal masks and neither. torch.nn.TransformerEncoder around selfattn layers
(its inference path hands them nested tensors) and the layers under autocast
match torch's too."""
import pytest
import torch

from selfattn import nn as sa
from test_nn_common import assert_golden, clone_as, forward_backward, save_load

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")

D_MODEL, NHEAD, FF, N, S, T = 16, 4, 32, 2, 6, 5


class EncoderLayerSubclass(sa.TransformerEncoderLayer):
    pass


class DecoderLayerSubclass(sa.TransformerDecoderLayer):
    pass


def _encoder_layer(cls=sa.TransformerEncoderLayer, **kw):
    return cls(D_MODEL, NHEAD, FF, batch_first=True, **kw)


def _decoder_layer(cls=sa.TransformerDecoderLayer, **kw):
    return cls(D_MODEL, NHEAD, FF, batch_first=True, **kw)


MODELS = {
    "encoder_layer": lambda: _encoder_layer(),
    "encoder_layer_subclass": lambda: _encoder_layer(EncoderLayerSubclass, norm_first=True),
    "decoder_layer": lambda: _decoder_layer(),
    "decoder_layer_subclass": lambda: _decoder_layer(DecoderLayerSubclass, norm_first=True),
    "encoder": lambda: sa.TransformerEncoder(_encoder_layer(EncoderLayerSubclass), 2,
                                             enable_nested_tensor=False),
    "decoder": lambda: sa.TransformerDecoder(_decoder_layer(DecoderLayerSubclass), 2),
}


def _inputs(name):
    g = torch.Generator().manual_seed(3)
    src = torch.randn(N, S, D_MODEL, generator=g)
    pad = torch.arange(S) >= torch.tensor([[S], [S - 2]])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S)
    if "decoder" not in name:
        return (src,), [dict(), dict(src_key_padding_mask=pad),
                        {"mask" if name == "encoder" else "src_mask": causal,
                         "is_causal": True}]
    tgt = torch.randn(N, T, D_MODEL, generator=g)
    tgt_causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
    return (tgt, src), [dict(), dict(memory_key_padding_mask=pad),
                        dict(tgt_mask=tgt_causal, tgt_is_causal=True,
                             memory_key_padding_mask=pad)]


@pytest.mark.parametrize("name", MODELS.keys())
def test_scripted_equals_eager_in_training_and_eval(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    args, cases = _inputs(name)
    scripted = torch.jit.script(model)
    assert "selfattn::attention_forward" in str(scripted.inlined_graph)
    for kwargs in cases:
        model.train()
        scripted.train()
        torch.manual_seed(42)
        expected = model(*args, **kwargs)
        torch.manual_seed(42)
        torch.testing.assert_close(scripted(*args, **kwargs), expected, rtol=1e-5, atol=1e-6)
    model.eval()
    scripted = torch.jit.script(model)
    loaded = save_load(scripted)
    with torch.no_grad():
        for kwargs in cases:
            expected = model(*args, **kwargs)
            for _ in range(2):  # the profiling executor optimises the graph after a run
                for m in (scripted, loaded):
                    torch.testing.assert_close(m(*args, **kwargs), expected, rtol=1e-5,
                                               atol=1e-6)


def _torch_and_ours(kind, **kw):
    """torch's layer and selfattn's with the same weights."""
    torch.manual_seed(0)
    torch_cls, cls = {"encoder_layer": (torch.nn.TransformerEncoderLayer,
                                        sa.TransformerEncoderLayer),
                      "decoder_layer": (torch.nn.TransformerDecoderLayer,
                                        sa.TransformerDecoderLayer)}[kind]
    theirs = torch_cls(D_MODEL, NHEAD, FF, batch_first=True, **kw)
    ours = cls(D_MODEL, NHEAD, FF, batch_first=True, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
@pytest.mark.parametrize("case", [0, 1, 2], ids=["plain", "padding", "causal+padding"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_scripted_layer_matches_torchs_layer(kind, case, norm_first):
    """Outputs, input and parameter gradients of the scripted selfattn layer
    against torch's layer with the same weights (dropout 0)."""
    torch.manual_seed(0)
    if kind == "encoder_layer":
        theirs = torch.nn.TransformerEncoderLayer(D_MODEL, NHEAD, FF, dropout=0.0,
                                                  batch_first=True, norm_first=norm_first)
        cls = sa.TransformerEncoderLayer
    else:
        theirs = torch.nn.TransformerDecoderLayer(D_MODEL, NHEAD, FF, dropout=0.0,
                                                  batch_first=True, norm_first=norm_first)
        cls = sa.TransformerDecoderLayer
    args, cases = _inputs(kind)
    kwargs = cases[case]

    def run(module_cls, dtype, script):
        module = clone_as(theirs, module_cls, dtype)
        if module_cls is cls:
            for name in ("self_attn", "multihead_attn"):
                if hasattr(module, name):  # torch's MHA inside a deep copy: make it selfattn's
                    getattr(module, name).__class__ = sa.MultiheadAttention
        fn = torch.jit.script(module) if script else module
        return forward_backward(lambda *xs: fn(*xs, **kwargs), [a.to(dtype) for a in args],
                                list(module.parameters()))

    assert_golden(run(cls, torch.float32, True), run(None, torch.float32, False),
                  run(None, torch.float64, False))


def test_torchs_encoder_around_selfattn_layers():
    """torch.nn.TransformerEncoder's inference path nests padded input before
    its layers (the porting pattern: swap only the layer); the result equals
    torch's own encoder, zeros at padded positions included."""
    theirs, ours = _torch_and_ours("encoder_layer")
    torch_encoder = torch.nn.TransformerEncoder(theirs, 2).eval()
    mixed_encoder = torch.nn.TransformerEncoder(ours, 2).eval()
    mixed_encoder.load_state_dict(torch_encoder.state_dict())
    (src,), _ = _inputs("encoder_layer")
    pad = torch.arange(S) >= torch.tensor([[S], [S - 2]])
    with torch.no_grad():
        expected = torch_encoder(src, src_key_padding_mask=pad)
        got = mixed_encoder(src, src_key_padding_mask=pad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1, S - 2:], torch.zeros_like(got[1, S - 2:]))


@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
def test_layers_under_autocast_match_torch(kind):
    theirs, ours = _torch_and_ours(kind, dropout=0.0)
    args, cases = _inputs(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = theirs(*args, **cases[1])
        got = ours(*args, **cases[1])
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)
