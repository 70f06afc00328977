"""nn.Module layers on selfattn's fused attention (`from selfattn import nn as sa`).

Drop-ins for torch's layers: `MultiheadAttention`, `TransformerEncoderLayer`,
`TransformerDecoderLayer`, `TransformerEncoder`, `TransformerDecoder` subclass
torch's classes, so constructors, parameter names, initialisation and
state_dicts are torch's own; only the attention runs through selfattn's
forward op ((B, S, H, D) views of the projections, no copies) and, for
need_weights, its probabilities op from the forward's logsumexp. Their
forwards are TorchScript-compatible, so scripted layers keep the fused ops in
their graphs. torch's masks (True = NOT allowed, float = added) are
translated to the kernel's arguments: a suffix key padding becomes
`key_lengths`, is_causal becomes the kernel's causal flag, anything else one
broadcast mask.

Further layers with selfattn's own conventions (bool masks True = takes part,
batch-first (B, S, E) inputs): `SelfAttention`, `CausalSelfAttention`,
`LocalSelfAttention`, `HierarchicalSelfAttention`, `AdditiveAttention`,
`SinusoidalPositionalEncoding`, `RotaryEmbedding`.

A query that sees no key at all gets 0 (torch's MultiheadAttention gives NaN
there with need_weights=True; README, "Drop-ins: what matches torch").
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from torch.nn.attention.bias import CausalBias

from . import reference
from ._args import MAX_HEAD_DIM, default_scale
from .errors import (ArgumentAssertionError, ArgumentError, ArgumentTypeAssertionError,
                     ArgumentTypeError)
from .functional import attention, fused_forward, fused_probs, math_only, rng_state

__all__ = [
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerDecoder", "SelfAttention", "CausalSelfAttention",
    "LocalSelfAttention", "HierarchicalSelfAttention", "AdditiveAttention",
    "SinusoidalPositionalEncoding", "RotaryEmbedding", "KVCache",
]


# ---------------------------------------------------------------------------
# torch-convention masks -> kernel arguments (TorchScript-compatible: the
# drop-in layers script with the fused ops in their graphs)


def _suffix_lengths(key_padding_mask: Tensor) -> Optional[Tensor]:
    """(N,) key lengths when the bool (N, S) padding mask (True = padding) pads
    exactly a suffix of every row, else None. Reads the mask on the host, so it
    is skipped under torch.compile and torch.jit.trace (the caller then uses a
    mask), which would bake the host's answer into the graph."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
    lengths = (~key_padding_mask).sum(1)
    suffix = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device) \
        >= lengths.unsqueeze(1)
    if torch.equal(suffix, key_padding_mask):
        return lengths
    return None


def _torch_mask_to_selfattn(mask: Tensor, pad: int) -> Tensor:
    """A torch-convention mask (bool True = not allowed, or float added) as a
    selfattn one (bool True = takes part, or float), with `pad` always-visible
    key columns appended (bias_k / zero-attention keys)."""
    if mask.dtype == torch.bool:
        mask = ~mask
    if pad == 0:
        return mask
    shape = list(mask.shape[:-1]) + [pad]
    always = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([mask, always], -1)


def _as_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A selfattn-convention mask as a float one: bool False -> -inf, True -> 0."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


def _merge_masks(a: Optional[Tensor], b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Combines two selfattn-convention masks (broadcasting): bool & bool stays
    bool, otherwise the bool one becomes 0 / -inf and the two are added."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _as_float_mask(a, dtype) + _as_float_mask(b, dtype)


def _linear(x: Tensor, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
    """F.linear; a bias of another dtype than the weight is added in place
    after the product (the product keeps the weight's dtype), as torch's
    MultiheadAttention accepts it."""
    assert w is not None
    if b is not None and b.dtype != w.dtype:
        return F.linear(x, w).add_(b)
    return F.linear(x, w, b)


def _chunk3(t: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if t is None:
        return None, None, None
    a, b, c = t.chunk(3)
    return a, b, c


def _check_eager(fn: str, mha: torch.nn.MultiheadAttention, key_padding_mask,
                 attn_mask, dropout_p: float) -> None:
    """The checks of MultiheadAttention.forward that TorchScript cannot
    express (argument types and tensor subclasses; scripted graphs get plain
    tensors), and what selfattn does not take (errors also AssertionErrors)."""
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor):
            raise ArgumentTypeAssertionError(
                f"{fn}: {name} must be a torch.Tensor, got {type(mask).__name__}")
        if isinstance(mask, CausalBias):
            raise ArgumentTypeAssertionError(
                f"{fn}: {name} is a CausalBias, which MultiheadAttention does not take (as "
                "torch's); pass a causal mask with is_causal=True")
        if mask.is_nested or mask.layout != torch.strided:
            raise ArgumentTypeAssertionError(f"{fn}: {name} must be a dense (strided) tensor")
    if mha.head_dim > MAX_HEAD_DIM:
        raise ArgumentAssertionError(
            f"{fn}: embed_dim / num_heads = {mha.head_dim} exceeds selfattn's largest head dim, "
            f"{MAX_HEAD_DIM}")
    if dropout_p >= 1.0:
        raise ArgumentAssertionError(
            f"{fn}: dropout must be below 1 in training, got {dropout_p}")


@torch.jit.unused
def _reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                         key_lengths: Optional[Tensor], causal: bool, dropout_p: float,
                         need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """selfattn.reference's math for the layers inside sdpa_kernel(SDPBackend.MATH):
    output and (need_weights) probabilities, with one dropout mask for both."""
    N, L, H, _ = q.shape
    keep = None
    if dropout_p > 0:
        keep = torch.rand(N, H, L, k.shape[1], device=q.device) >= dropout_p
    masking = dict(causal=causal, causal_alignment="top_left", attn_mask=attn_mask,
                   key_lengths=key_lengths, dropout_p=dropout_p, dropout_mask=keep)
    out = reference.attention(q, k, v, **masking)
    weights = None
    if need_weights:
        with torch.no_grad():
            weights = reference.attention_weights(q, k, **masking)
    return out, weights


# ---------------------------------------------------------------------------
# torch.nn drop-ins


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on selfattn's fused kernel.

    Same constructor, parameters (in_proj_weight or q/k/v_proj_weight,
    in_proj_bias, out_proj, bias_k, bias_v), initialisation and state_dict as
    torch's; forward has torch's signature, masks and errors (exceptions are
    also AssertionErrors where torch asserts); scriptable with torch.jit.script
    (the fused ops are in the scripted graph):

    Args (forward):
        query: (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E).
        key: (S, N, kdim) / (N, S, kdim) / (S, kdim). value: same with vdim.
        key_padding_mask: (N, S) or (S,) unbatched; bool True = padding, or
            float added to the scores. A bool mask that pads a suffix of each
            row runs as per-batch key lengths.
        need_weights: also return the attention probabilities, computed by
            the `attention_probs` op from the forward's logsumexp and dropout
            state (they carry no gradient; in training with dropout they are
            the dropped-out ones, as torch's).
        attn_mask: (L, S) or (N * num_heads, L, S); bool True = not allowed, or
            float added.
        average_attn_weights: average the weights over heads.
        is_causal: hint that attn_mask is the causal mask; as in torch it
            requires attn_mask, and the kernel then applies the causal mask
            itself (top-left aligned). Without key_padding_mask and weights,
            attn_mask's shape is not checked either (torch does not read it).

    Returns:
        (attn_output, attn_weights): output shaped like query with embed_dim
        features; weights (N, L, S') averaged or (N, num_heads, L, S') (S' = S
        plus bias_k and zero-attention keys), without the batch dim for
        unbatched input, or None when need_weights is False. Queries that see no
        key give 0. Jagged nested tensors (torch.nested, layout=torch.jagged,
        (N, j, E), batch_first) run the packed varlen kernels in training and
        inference (torch takes nested inputs only on its inference fast
        path), with need_weights=False and no masks.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        fn = "selfattn.nn.MultiheadAttention"
        if query.is_nested or key.is_nested or value.is_nested:
            if torch.jit.is_scripting():
                raise ArgumentTypeAssertionError(
                    f"{fn}: nested tensor inputs are not supported in TorchScript")
            return self._jagged_forward(fn, query, key, value, key_padding_mask, need_weights,
                                        attn_mask)
        dropout_p = float(self.dropout) if self.training else 0.0
        if not torch.jit.is_scripting():
            _check_eager(fn, self, key_padding_mask, attn_mask, dropout_p)
        # As torch: with is_causal, no key_padding_mask and no weights, attn_mask
        # is only a hint whose shape is not checked.
        causal_hint = is_causal and key_padding_mask is None and not need_weights
        batched = self._check_inputs(fn, query, key, value, key_padding_mask, attn_mask,
                                     causal_hint)
        if is_causal and attn_mask is None:
            raise ArgumentError(
                f"{fn}: is_causal=True needs attn_mask (the causal mask it hints at), as in "
                "torch; build one with torch.nn.Transformer.generate_square_subsequent_mask")
        # Work batch-first: (N, L, E) views of the inputs.
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        H = self.num_heads
        q, k, v = self._project(query, key, value)
        extra = 0
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, bias_v.expand(N, 1, E)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1
        S = k.shape[1]
        q = q.unflatten(-1, [H, self.head_dim])
        k = k.unflatten(-1, [H, self.head_dim])
        v = v.unflatten(-1, [H, self.head_dim])

        # With a truthful hint the causal flag equals attn_mask. With appended
        # keys torch itself differs by path: its SDPA path (no key_padding_mask,
        # no weights) applies top-left causality to them too, its other path
        # pads attn_mask so that every query sees them; both are mirrored.
        causal = is_causal and (extra == 0 or causal_hint)
        mask: Optional[Tensor] = None
        key_lengths: Optional[Tensor] = None
        if attn_mask is not None and not causal:
            mask = _torch_mask_to_selfattn(attn_mask, extra)
            if mask.dim() == 3:
                mask = mask.view(N, H, L, S)
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool and extra == 0:
                key_lengths = _suffix_lengths(key_padding_mask)
            if key_lengths is None:
                kpm = _torch_mask_to_selfattn(key_padding_mask, extra).view(N, 1, 1, S)
                mask = _merge_masks(mask, kpm, q.dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        weights: Optional[Tensor] = None
        reference_math = False
        if not torch.jit.is_scripting():
            reference_math = math_only()
        if reference_math:
            out, weights = _reference_attention(q, k, v, mask, key_lengths, causal, dropout_p,
                                                need_weights)
        else:
            # One dropout state for the output and the weights: the same mask.
            rng = rng_state(dropout_p, q.device)
            scale = default_scale(self.head_dim)
            right = 0 if causal else -1  # causal: top-left, as torch's is_causal
            out, lse = fused_forward(q, k, v, mask, key_lengths, rng, scale, -1, right, 0,
                                     dropout_p)
            if need_weights:
                weights = fused_probs(q, k, lse, mask, key_lengths, rng, scale, -1, right,
                                      0, dropout_p)
        # (N, L, H, D) -> query's layout, one copy, then the output projection.
        if self.batch_first or not batched:
            out = out.flatten(2)
        else:
            out = out.transpose(0, 1).flatten(2)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _check_inputs(self, fn: str, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                      causal_hint: bool) -> bool:
        """torch's checks (errors that are also AssertionErrors, naming the
        argument); returns whether the input is batched."""
        if query.dim() != 2 and query.dim() != 3:
            raise ArgumentAssertionError(
                f"{fn}: query must be (L, E) unbatched or 3-D batched, got shape "
                f"{list(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ArgumentAssertionError(
                f"{fn}: key and value must be {query.dim()}-D like query, got shapes "
                f"{list(key.shape)} and {list(value.shape)}")
        if key.shape[-1] != self.kdim:
            raise ArgumentAssertionError(
                f"{fn}: key must have {self.kdim} features, got {key.shape[-1]}")
        if value.shape[-1] != self.vdim:
            raise ArgumentAssertionError(
                f"{fn}: value must have {self.vdim} features, got {value.shape[-1]}")
        if query.shape[-1] != self.embed_dim:
            raise ArgumentAssertionError(
                f"{fn}: query must have embed_dim={self.embed_dim} features, got "
                f"{query.shape[-1]}")
        seq = 1 if (batched and self.batch_first) else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise ArgumentAssertionError(
                f"{fn}: key {list(key.shape)} and value {list(value.shape)} must agree in "
                "batch and sequence length")
        N = 1
        if batched:
            N = query.shape[1 - seq]
            if key.shape[1 - seq] != N:
                raise ArgumentAssertionError(
                    f"{fn}: key has batch size {key.shape[1 - seq]}, query {N}")
        L, S = query.shape[seq], key.shape[seq]
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.device != query.device:
                raise ArgumentAssertionError(
                    f"{fn}: {name} is on {mask.device}, but query is on {query.device}")
        if key_padding_mask is not None:
            expected = [N, S] if batched else [S]
            if list(key_padding_mask.shape) != expected:
                raise ArgumentAssertionError(
                    f"{fn}: key_padding_mask must have shape {expected}, got "
                    f"{list(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise ArgumentTypeAssertionError(
                    f"{fn}: key_padding_mask must be bool or float, got {key_padding_mask.dtype}")
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise ArgumentTypeAssertionError(
                    f"{fn}: attn_mask must be bool or float, got {attn_mask.dtype}")
            shape = list(attn_mask.shape)
            two_d, three_d = [L, S], [N * self.num_heads, L, S]
            if attn_mask.dim() != 2 and attn_mask.dim() != 3:
                raise ArgumentAssertionError(
                    f"{fn}: attn_mask must be 2-D (L, S) = {two_d} or 3-D (N * num_heads, L, S) "
                    f"= {three_d}, got shape {shape}")
            # torch checks an unbatched 3-D mask's shape even when it is only a hint
            if (not causal_hint or (not batched and attn_mask.dim() == 3)) \
                    and shape != two_d and shape != three_d:
                raise ArgumentAssertionError(
                    f"{fn}: attn_mask must have shape (L, S) = {two_d} or (N * num_heads, L, S) "
                    f"= {three_d}, got {shape}")
        return batched

    @torch.jit.unused
    def _jagged_forward(self, fn: str, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Optional[Tensor], need_weights: bool,
                        attn_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Jagged nested (N, j, E) inputs (batch_first): projections on the
        packed values, attention by selfattn.varlen_attention, the output
        nested like query. No masks, weights or appended keys."""
        from .varlen import varlen_attention

        for name, t in (("query", query), ("key", key), ("value", value)):
            if not (t.is_nested and t.layout == torch.jagged and t.dim() == 3
                    and t._ragged_idx == 1):
                raise ArgumentTypeAssertionError(
                    f"{fn}: with nested tensors, query, key and value must all be jagged "
                    f"(layout=torch.jagged) of shape (N, j, E) with the sequence dim ragged; "
                    f"{name} is not")
        if not self.batch_first:
            raise ArgumentAssertionError(f"{fn}: nested tensor inputs need batch_first=True")
        if need_weights or key_padding_mask is not None or attn_mask is not None:
            raise ArgumentAssertionError(
                f"{fn}: with nested tensors pass need_weights=False and no key_padding_mask "
                "or attn_mask (the jagged lengths are the padding)")
        if self.bias_k is not None or self.add_zero_attn:
            raise ArgumentAssertionError(
                f"{fn}: nested tensor inputs do not support bias_k/bias_v or add_zero_attn")
        values = {}
        for t in (query, key, value):  # one packed tensor per distinct input (self-attention)
            values.setdefault(id(t), t.values())
        qv, kv, vv = (values[id(t)] for t in (query, key, value))
        q, k, v = self._project(qv.unsqueeze(0), kv.unsqueeze(0), vv.unsqueeze(0))
        H, D = self.num_heads, self.head_dim
        cu_q, cu_k = query.offsets(), key.offsets()
        if value.offsets() is not cu_k and not torch.equal(value.offsets(), cu_k):
            raise ArgumentAssertionError(f"{fn}: key and value must have the same lengths")
        out = varlen_attention(q[0].unflatten(-1, [H, D]), k[0].unflatten(-1, [H, D]),
                               v[0].unflatten(-1, [H, D]), cu_q, cu_k,
                               int(cu_q.diff().max()), int(cu_k.diff().max()),
                               dropout_p=float(self.dropout) if self.training else 0.0)
        out = self.out_proj(out.flatten(1))
        return torch.nested.nested_tensor_from_jagged(out, cu_q), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projections of (N, L|S, *) inputs to (N, L|S, E); self-attention
        runs one packed matmul and returns views of its output."""
        E = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = _chunk3(b)
            return (_linear(query, self.q_proj_weight, bq), _linear(key, self.k_proj_weight, bk),
                    _linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        assert w is not None
        if query is key and key is value:
            q, k, v = _linear(query, w, b).chunk(3, dim=-1)
            return q, k, v
        if key is value:
            bq: Optional[Tensor] = None
            bkv: Optional[Tensor] = None
            if b is not None:
                bq, bkv = b[:E], b[E:]
            k, v = _linear(key, w[E:], bkv).chunk(2, dim=-1)
            return _linear(query, w[:E], bq), k, v
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = _chunk3(b)
        return _linear(query, wq, bq), _linear(key, wk, bk), _linear(value, wv, bv)


def _use_fused(mha: torch.nn.MultiheadAttention) -> MultiheadAttention:
    """Turns the torch MHA a torch layer built into selfattn's in place. The
    subclass adds no state, so the parameters, their initialisation and the RNG
    stream stay exactly torch's: one seed gives both layers the same weights."""
    mha.__class__ = MultiheadAttention
    return mha


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer with selfattn attention: same
    constructor (d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation=relu (str or callable), layer_norm_eps, batch_first,
    norm_first, bias, device, dtype), submodules and state_dict.

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    src (S, N, E) / (N, S, E) with batch_first / (S, E); masks as
    `MultiheadAttention`'s attn_mask and key_padding_mask. torch's inference
    fast path (which would bypass the kernel) is not taken. A nested src
    (what torch.nn.TransformerEncoder's inference path hands its layers) is
    run padded, with its padding masked, and returned nested.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_fused(self.self_attn)

    @torch.jit.unused
    def _nested_forward(self, src: Tensor, src_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        rows = src.unbind()
        lengths = torch.tensor([t.shape[0] for t in rows], device=src.device)
        padded = src.to_padded_tensor(0.0)  # (N, S, E): torch nests batch-first input only
        padding = torch.arange(padded.shape[1], device=src.device) >= lengths.unsqueeze(1)
        out = self.forward(padded, src_mask, padding, is_causal)
        return torch.nested.nested_tensor([out[i, :n] for i, n in enumerate(lengths.tolist())],
                                          layout=src.layout)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if src.is_nested:
            return self._nested_forward(src, src_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer with selfattn self- and cross-attention:
    same constructor, submodules, state_dict and forward(tgt, memory, tgt_mask,
    memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
    memory_is_causal) as torch's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_fused(self.self_attn)
        _use_fused(self.multihead_attn)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder for selfattn layers: same constructor and
    forward(src, mask=None, src_key_padding_mask=None, is_causal=None); masks
    reach the layers as given (a bool padding mask can then run as key
    lengths) and torch's nested-tensor fast path is not taken."""

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        seq_len = _get_seq_len(src, self.layers[0].self_attn.batch_first)
        is_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal,
                           src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder (same constructor and forward), for stacks
    of selfattn `TransformerDecoderLayer`s."""


# ---------------------------------------------------------------------------
# selfattn-convention layers (batch-first, bool masks True = takes part)


def _check_btc(fn: str, name: str, x: Tensor, features: int) -> None:
    if x.dim() != 3 or x.shape[-1] != features:
        raise ArgumentError(f"{fn}: {name} must be (B, S, {features}), got shape {tuple(x.shape)}")


class SelfAttention(torch.nn.Module):
    """Parameter-free self-attention y = softmax(X Xᵀ · scale) X.

    Args:
        scaled: scale the scores by 1 / sqrt(D) (True) or not (False).
        causal: each position sees only itself and earlier ones.

    forward(x, attn_mask=None, key_lengths=None): x (B, S, D) -> (B, S, D);
    attn_mask bool (True = takes part) or float, broadcastable to (B, 1, S, S);
    key_lengths (B,) int.
    """

    def __init__(self, scaled: bool = True, causal: bool = False):
        super().__init__()
        self.scaled = scaled
        self.causal = causal

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                key_lengths: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3:
            raise ArgumentError(f"selfattn.nn.SelfAttention: x must be (B, S, D), got shape "
                                f"{tuple(x.shape)}")
        h = x.unsqueeze(2)  # (B, S, 1, D)
        out = attention(h, h, h, causal=self.causal, scale=None if self.scaled else 1.0,
                        attn_mask=attn_mask, key_lengths=key_lengths)
        return out.squeeze(2)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}, causal={self.causal}"


class _ProjectedSelfAttention(torch.nn.Module):
    """Self-attention with one fused qkv projection (E -> (H + 2 Hkv) D) and an
    output projection; subclasses fix the visibility (causal, window)."""

    _name = "selfattn.nn._ProjectedSelfAttention"

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 dropout: float = 0.0, bias: bool = True, rotary: bool = False,
                 rotary_base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ArgumentError(
                f"{self._name}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ArgumentError(f"{self._name}: num_kv_heads {num_kv_heads} must divide num_heads "
                                f"{num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ArgumentError(f"{self._name}: dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.qkv_proj = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, **kw)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, **kw)
        self.rotary = RotaryEmbedding(self.head_dim, base=rotary_base) if rotary else None

    def _attend(self, x: Tensor, key_lengths: Optional[Tensor], **visibility) -> Tensor:
        _check_btc(self._name, "x", x, self.embed_dim)
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))  # (B, S, H, D) views
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        out = attention(q, k, v, key_lengths=key_lengths,
                        dropout_p=self.dropout if self.training else 0.0, **visibility)
        return self.out_proj(out.flatten(2))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, dropout={self.dropout}")


class CausalSelfAttention(_ProjectedSelfAttention):
    """GPT-style causal self-attention: fused qkv Linear (parameter qkv_proj),
    out_proj, attention dropout in training, optional grouped-query heads
    (num_kv_heads) and rotary position embedding (rotary=True).

    forward(x, key_lengths=None): x (B, S, embed_dim) -> (B, S, embed_dim).
    """

    _name = "selfattn.nn.CausalSelfAttention"

    def forward(self, x: Tensor, key_lengths: Optional[Tensor] = None,
                cache: Optional["KVCache"] = None) -> Tensor:
        """With `cache` (generation, inference only): x holds the new tokens
        (B, n, embed_dim), which are appended to the cache and attend to
        everything cached (rotary at the cache's positions)."""
        if cache is None:
            return self._attend(x, key_lengths, causal=True)
        if key_lengths is not None:
            raise ArgumentError(f"{self._name}: with a cache, the cache's lengths are the key "
                                "lengths; pass key_lengths=None")
        _check_btc(self._name, "x", x, self.embed_dim)
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions=cache.positions(x.shape[1]))
        return self.out_proj(cache.append_and_attend(q, k, v).flatten(2))


class LocalSelfAttention(_ProjectedSelfAttention):
    """Sliding-window self-attention: position i sees j with
    i - left <= j <= i + right, through the kernel's `window` (no dense mask,
    cost O(S · window)).

    Args:
        window: int w for (w, w), or a pair (left, right).
        causal: also hide the future (right = 0).
        (others as `CausalSelfAttention`)

    forward(x, key_lengths=None): x (B, S, embed_dim) -> (B, S, embed_dim).
    """

    _name = "selfattn.nn.LocalSelfAttention"

    def __init__(self, embed_dim: int, num_heads: int, window: Union[int, Tuple[int, int]],
                 causal: bool = False, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)
        if isinstance(window, int):
            window = (window, window)
        if len(window) != 2 or any(not isinstance(w, int) or w < 0 for w in window):
            raise ArgumentError(f"{self._name}: window must be an int >= 0 or a pair of them, got "
                                f"{window!r}")
        self.window = tuple(window)
        self.causal = causal

    def forward(self, x: Tensor, key_lengths: Optional[Tensor] = None) -> Tensor:
        return self._attend(x, key_lengths, window=self.window, causal=self.causal)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, causal={self.causal}"


class _SegmentSelfAttention(_ProjectedSelfAttention):
    _name = "selfattn.nn.HierarchicalSelfAttention"

    def forward(self, x: Tensor, key_lengths: Optional[Tensor]) -> Tensor:
        return self._attend(x, key_lengths)


class HierarchicalSelfAttention(torch.nn.Module):
    """Two-level self-attention: full attention within segments of
    `segment_len` tokens (run as a batch of segments), then attention across
    the segments' mean summaries, whose output is added back to every token of
    its segment. Cost O(S · segment_len + (S / segment_len)²).

    Args: embed_dim, num_heads, segment_len, dropout (attention dropout),
    bias, device, dtype. Submodules `local` and `global_` (each qkv_proj +
    out_proj).

    forward(x, key_lengths=None): x (B, S, embed_dim) -> (B, S, embed_dim);
    S need not be a multiple of segment_len; key_lengths (B,) marks padding.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_len: int, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if segment_len < 1:
            raise ArgumentError(f"selfattn.nn.HierarchicalSelfAttention: segment_len must be >= 1, "
                                f"got {segment_len}")
        self.segment_len = segment_len
        kw = dict(dropout=dropout, bias=bias, device=device, dtype=dtype)
        self.local = _SegmentSelfAttention(embed_dim, num_heads, **kw)
        self.global_ = _SegmentSelfAttention(embed_dim, num_heads, **kw)

    def forward(self, x: Tensor, key_lengths: Optional[Tensor] = None) -> Tensor:
        _check_btc("selfattn.nn.HierarchicalSelfAttention", "x", x, self.local.embed_dim)
        B, S, E = x.shape
        P = self.segment_len
        n = -(-S // P)  # segments
        lengths = (torch.full((B,), S, device=x.device) if key_lengths is None
                   else key_lengths.to(device=x.device, dtype=torch.int64))
        starts = torch.arange(n, device=x.device) * P
        seg_lengths = (lengths.unsqueeze(1) - starts).clamp(0, P)  # (B, n) valid tokens
        xs = F.pad(x, (0, 0, 0, n * P - S)).view(B * n, P, E)
        local = self.local(xs, seg_lengths.flatten())  # (B * n, P, E)
        valid = torch.arange(P, device=x.device) < seg_lengths.view(B * n, 1)
        summary = (local * valid.unsqueeze(-1)).sum(1) / seg_lengths.view(B * n, 1).clamp(min=1)
        g = self.global_(summary.view(B, n, E), (lengths + P - 1) // P)  # (B, n, E)
        out = local.view(B, n, P, E) + g.unsqueeze(2)
        return out.view(B, n * P, E)[:, :S]


# ---------------------------------------------------------------------------
# Additive (Bahdanau) attention, chunked over keys


def _additive_scores(qw: Tensor, ku: Tensor, w: Tensor, attn_mask: Optional[Tensor],
                     key_lengths: Optional[Tensor], j0: int, j1: int, acc: torch.dtype):
    """Scores of keys [j0, j1): (tanh (B, Sq, C, A), scores (B, Sq, C) in `acc`
    with -inf where hidden)."""
    t = torch.tanh(qw.unsqueeze(2) + ku[:, j0:j1].unsqueeze(1))
    s = (t @ w).to(acc)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask[..., j0:j1], float("-inf"))
    if key_lengths is not None:
        keys = torch.arange(j0, j1, device=s.device)
        s = s.masked_fill(keys >= key_lengths.view(-1, 1, 1), float("-inf"))
    return t, s


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _AdditiveAttentionFn(torch.autograd.Function):
    """out = softmax_j(wᵀ tanh(qw_i + ku_j)) v, one chunk of keys at a time with
    an online softmax; the backward recomputes each chunk from the saved
    logsumexp. Memory O(B · Sq · chunk · A), never O(B · Sq · Sk · A)."""

    @staticmethod
    def forward(ctx, qw, ku, v, w, attn_mask, key_lengths, chunk):
        B, Sq, _ = qw.shape
        Sk = ku.shape[1]
        acc = torch.float64 if qw.dtype == torch.float64 else torch.float32
        row_max = qw.new_full((B, Sq), float("-inf"), dtype=acc)
        row_sum = qw.new_zeros((B, Sq), dtype=acc)
        o = qw.new_zeros((B, Sq, v.shape[-1]), dtype=acc)
        for j0 in range(0, Sk, chunk):
            j1 = min(j0 + chunk, Sk)
            _, s = _additive_scores(qw, ku, w, attn_mask, key_lengths, j0, j1, acc)
            row_max_new = torch.maximum(row_max, s.amax(-1))
            ref = _finite_or_zero(row_max_new)  # rows that saw no key yet: any finite value
            alpha = torch.exp(row_max - ref)
            p = torch.exp(s - ref.unsqueeze(-1))
            row_sum = row_sum * alpha + p.sum(-1)
            o = o * alpha.unsqueeze(-1) + p @ v[:, j0:j1].to(acc)
            row_max = row_max_new
        seen = row_sum > 0
        out = torch.where(seen.unsqueeze(-1), o / row_sum.clamp(min=1e-30).unsqueeze(-1), 0.0)
        lse = torch.where(seen, row_max + torch.log(row_sum.clamp(min=1e-30)), float("-inf"))
        out = out.to(v.dtype)
        ctx.save_for_backward(qw, ku, v, w, attn_mask, key_lengths, out, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qw, ku, v, w, attn_mask, key_lengths, out, lse = ctx.saved_tensors
        acc = lse.dtype
        Sk = ku.shape[1]
        dout = dout.to(acc)
        delta = (dout * out.to(acc)).sum(-1, keepdim=True)  # (B, Sq, 1)
        lse_safe = _finite_or_zero(lse).unsqueeze(-1)
        dqw = torch.zeros_like(qw, dtype=acc)
        dku = torch.zeros_like(ku, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dw = torch.zeros_like(w, dtype=acc)
        for j0 in range(0, Sk, ctx.chunk):
            j1 = min(j0 + ctx.chunk, Sk)
            t, s = _additive_scores(qw, ku, w, attn_mask, key_lengths, j0, j1, acc)
            p = torch.exp(s - lse_safe)  # 0 where hidden; rows seeing nothing have s = -inf
            dv[:, j0:j1] = p.transpose(1, 2) @ dout
            ds = p * (dout @ v[:, j0:j1].to(acc).transpose(1, 2) - delta)  # (B, Sq, C)
            t = t.to(acc)
            dw += torch.einsum("bqc,bqca->a", ds, t)
            dt = ds.unsqueeze(-1) * w.to(acc) * (1 - t * t)  # (B, Sq, C, A)
            dqw += dt.sum(2)
            dku[:, j0:j1] = dt.sum(1)
        return (dqw.to(qw.dtype), dku.to(ku.dtype), dv.to(v.dtype), dw.to(w.dtype),
                None, None, None)


def additive_attention(qw: Tensor, ku: Tensor, v: Tensor, w: Tensor,
                       attn_mask: Optional[Tensor] = None, key_lengths: Optional[Tensor] = None,
                       chunk_size: Optional[int] = None, return_lse: bool = False):
    """Additive attention on projected inputs, chunked over keys.

    Args:
        qw: (B, Sq, A) projected queries W q. ku: (B, Sk, A) projected keys
            U k (+ bias). v: (B, Sk, Dv) values. w: (A,) score vector.
        attn_mask: bool, True = takes part, broadcastable to (B, Sq, Sk).
        key_lengths: (B,) int; keys at positions >= key_lengths[b] are hidden.
        chunk_size: keys per chunk; default keeps a chunk's (B, Sq, chunk, A)
            tanh under 2**22 elements.

    Returns:
        out (B, Sq, Dv) (rows that see no key are 0) [, lse (B, Sq)].
    """
    fn = "selfattn.nn.additive_attention"
    B, Sq, A = qw.shape
    if ku.dim() != 3 or ku.shape[0] != B or ku.shape[2] != A:
        raise ArgumentError(f"{fn}: ku must be (B, Sk, A) = ({B}, Sk, {A}), got {tuple(ku.shape)}")
    if v.dim() != 3 or v.shape[:2] != ku.shape[:2]:
        raise ArgumentError(f"{fn}: v must be (B, Sk, Dv) with (B, Sk) = {tuple(ku.shape[:2])}, "
                            f"got {tuple(v.shape)}")
    if w.shape != (A,):
        raise ArgumentError(f"{fn}: w must have shape ({A},), got {tuple(w.shape)}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ArgumentTypeError(
                f"{fn}: attn_mask must be bool (True = takes part), got {attn_mask.dtype}")
        attn_mask = attn_mask.expand(B, Sq, ku.shape[1])
    if key_lengths is not None and tuple(key_lengths.shape) != (B,):
        raise ArgumentError(
            f"{fn}: key_lengths must have shape ({B},), got {tuple(key_lengths.shape)}")
    if chunk_size is None:
        chunk_size = max(1, 2**22 // max(1, B * Sq * A))
    if chunk_size < 1:
        raise ArgumentError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    out, lse = _AdditiveAttentionFn.apply(qw, ku, v, w, attn_mask, key_lengths, int(chunk_size))
    return (out, lse) if return_lse else out


class AdditiveAttention(torch.nn.Module):
    """Bahdanau attention: score(q_i, k_j) = wᵀ tanh(W q_i + U k_j + b),
    out_i = Σ_j softmax_j(score) v_j, chunked over keys so memory stays
    O(B · Sq · chunk · hidden_dim) in forward and backward.

    Args:
        query_dim, key_dim (default query_dim), hidden_dim (default query_dim).
        bias: bias b of U. chunk_size: keys per chunk (see additive_attention).
        Parameters: query_proj.weight (W), key_proj.weight/.bias (U, b),
        score_weight (w).

    forward(query, key, value=None, attn_mask=None, key_lengths=None,
    need_weights=False): query (B, Sq, query_dim), key (B, Sk, key_dim),
    value (B, Sk, Dv) (default key) -> out (B, Sq, Dv), and with need_weights
    also the probabilities (B, Sq, Sk) (no gradient).
    """

    def __init__(self, query_dim: int, key_dim: Optional[int] = None,
                 hidden_dim: Optional[int] = None, bias: bool = True,
                 chunk_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        kw = dict(device=device, dtype=dtype)
        self.query_proj = torch.nn.Linear(query_dim, hidden_dim, bias=False, **kw)
        self.key_proj = torch.nn.Linear(key_dim, hidden_dim, bias=bias, **kw)
        self.score_weight = torch.nn.Parameter(torch.empty(hidden_dim, **kw))
        self.chunk_size = chunk_size
        bound = 1.0 / math.sqrt(hidden_dim)
        torch.nn.init.uniform_(self.score_weight, -bound, bound)

    def forward(self, query: Tensor, key: Tensor, value: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, key_lengths: Optional[Tensor] = None,
                need_weights: bool = False):
        fn = "selfattn.nn.AdditiveAttention"
        _check_btc(fn, "query", query, self.query_proj.in_features)
        _check_btc(fn, "key", key, self.key_proj.in_features)
        value = key if value is None else value
        qw, ku = self.query_proj(query), self.key_proj(key)
        out, lse = additive_attention(qw, ku, value, self.score_weight, attn_mask, key_lengths,
                                      self.chunk_size, return_lse=True)
        if not need_weights:
            return out
        with torch.no_grad():
            mask = None if attn_mask is None else attn_mask.expand(*qw.shape[:2], ku.shape[1])
            _, s = _additive_scores(qw, ku, self.score_weight, mask, key_lengths, 0, ku.shape[1],
                                    lse.dtype)
            weights = torch.exp(s - _finite_or_zero(lse).unsqueeze(-1)).to(query.dtype)
        return out, weights


# ---------------------------------------------------------------------------
# Position encodings


class SinusoidalPositionalEncoding(torch.nn.Module):
    """Adds the sinusoidal encoding of "Attention Is All You Need":
    pe[p, 2i] = sin(p / base^(2i/E)), pe[p, 2i+1] = cos(p / base^(2i/E)).

    Args: embed_dim E, max_len (longest sequence, offset included), dropout
    applied after the addition, batch_first (x (B, S, E) if True, else
    (S, B, E)), base. No parameters; the table is a non-persistent buffer.

    forward(x, offset=0): x + pe[offset : offset + S], same shape as x.
    """

    def __init__(self, embed_dim: int, max_len: int = 8192, dropout: float = 0.0,
                 batch_first: bool = True, base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float64, device=device).unsqueeze(1)
        freq = base ** (-torch.arange(0, embed_dim, 2, dtype=torch.float64, device=device) / embed_dim)
        pe = torch.zeros(max_len, embed_dim, dtype=torch.float64, device=device)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: embed_dim // 2])
        self.register_buffer("pe", pe.to(dtype or torch.get_default_dtype()), persistent=False)
        self.dropout = torch.nn.Dropout(dropout)
        self.batch_first = batch_first

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        S = x.shape[1] if self.batch_first else x.shape[0]
        if offset + S > self.pe.shape[0]:
            raise ArgumentError(f"selfattn.nn.SinusoidalPositionalEncoding: offset + sequence "
                                f"length {offset + S} exceeds max_len {self.pe.shape[0]}")
        pe = self.pe[offset:offset + S].to(x.dtype)
        return self.dropout(x + (pe if self.batch_first else pe.unsqueeze(1)))


class KVCache:
    """A KV cache for generation with selfattn.attention_with_kvcache: k and v
    buffers and each sequence's length. append_and_attend writes the new
    tokens' keys and values in place and attends the new queries to the whole
    cache (causal, bottom-right), then advances the lengths. One cache per
    attention layer; inference only.

    Preallocated (the default): buffers (B, max_len, num_kv_heads, head_dim).
    Paged (page_size given): a pool of num_pages pages (page_size,
    num_kv_heads, head_dim) shared by the batch (default: enough for every
    sequence to reach max_len), handed out to a sequence as it grows (the
    block table, (B, ceil(max_len / page_size)) int32), so a pool smaller
    than B * max_len holds sequences of different lengths; reset() frees them.

        caches = [KVCache(B, 1024, Hkv, D) for _ in layers]
        out = layer(x_new, cache=caches[i])   # selfattn.nn.CausalSelfAttention
    """

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 head_dim_v: Optional[int] = None, page_size: Optional[int] = None,
                 num_pages: Optional[int] = None, dtype=None, device=None):
        self.max_len, self.page_size = max_len, page_size
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        if page_size is None:
            if num_pages is not None:
                raise ArgumentError("selfattn.nn.KVCache: num_pages needs page_size")
            shape = (batch_size, max_len, num_kv_heads)
            self.block_table = None
        else:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
                raise ArgumentError(f"selfattn.nn.KVCache: page_size must be an int >= 1, got "
                                    f"{page_size!r}")
            per_sequence = -(-max_len // page_size)
            num_pages = batch_size * per_sequence if num_pages is None else num_pages
            shape = (num_pages, page_size, num_kv_heads)
            self.block_table = torch.full((batch_size, per_sequence), -1, dtype=torch.int32,
                                          device=device)
            self._host_table = [[] for _ in range(batch_size)]  # pages held, per sequence
            self._free = list(range(num_pages - 1, -1, -1))
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(*shape, head_dim_v or head_dim, dtype=dtype, device=device)

    def reset(self) -> None:
        self.lengths.zero_()
        if self.block_table is not None:
            for pages in self._host_table:
                self._free.extend(reversed(pages))
                pages.clear()
            self.block_table.fill_(-1)

    def positions(self, n: int) -> Tensor:
        """(B, n) positions of n new tokens."""
        return self.lengths.unsqueeze(1) + torch.arange(n, device=self.lengths.device)

    def _reserve(self, n: int) -> None:
        """Pages for n more tokens of every sequence, from the free list; all
        or none (a refusal takes no page)."""
        extra = []
        for b, length in enumerate(self.lengths.tolist()):
            if length + n > self.max_len:
                raise ArgumentError(f"selfattn.nn.KVCache: sequence {b} would hold "
                                    f"{length + n} tokens, past max_len = {self.max_len}")
            extra.append(-(-(length + n) // self.page_size) - len(self._host_table[b]))
        wanted = sum(max(e, 0) for e in extra)
        if wanted > len(self._free):
            raise ArgumentError(f"selfattn.nn.KVCache: the pool's {self.k.shape[0]} pages are "
                                f"all in use ({wanted} more needed, {len(self._free)} free); "
                                "make num_pages larger or reset()")
        for b, count in enumerate(extra):
            if count <= 0:
                continue
            held = self._host_table[b]
            pages = [self._free.pop() for _ in range(count)]
            self.block_table[b, len(held):len(held) + count] = torch.tensor(pages,
                                                                            dtype=torch.int32)
            held.extend(pages)

    def append_and_attend(self, q: Tensor, k: Tensor, v: Tensor,
                          window: Optional[Tuple[int, int]] = None) -> Tensor:
        """q (B, n, Hq, D), k and v (B, n, Hkv, D|Dv) of the new tokens -> (B, n, Hq, Dv)."""
        from .kvcache import attention_with_kvcache

        if self.block_table is not None:
            self._reserve(k.shape[1])
        with torch.no_grad():
            out = attention_with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.lengths,
                                         block_table=self.block_table, window=window)
        self.lengths += k.shape[1]
        return out


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoPE) of (B, S, H, D) queries and keys.

    Pairs (x[i], x[i + D/2]) (GPT-NeoX / LLaMA "rotate half" layout) or, with
    interleaved=True, (x[2i], x[2i+1]) (the paper's / GPT-J layout) rotate by
    position · base^(-2i/D). Angles are computed in float32 (float64 for
    float64 inputs). No parameters.

    forward(q, k, offset=0, positions=None): rotated (q, k); positions (S,) or
    (B, S) int overrides arange(offset, offset + S).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if head_dim % 2:
            raise ArgumentError(
                f"selfattn.nn.RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        acc = cos.dtype
        if self.interleaved:
            x1, x2 = x[..., 0::2].to(acc), x[..., 1::2].to(acc)
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = x.to(acc).chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)

    def forward(self, q: Tensor, k: Tensor, offset: int = 0,
                positions: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        fn = "selfattn.nn.RotaryEmbedding"
        for name, t in (("q", q), ("k", k)):
            if t.dim() != 4 or t.shape[-1] != self.head_dim:
                raise ArgumentError(f"{fn}: {name} must be (B, S, H, {self.head_dim}), got shape "
                                    f"{tuple(t.shape)}")
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if positions is None:
            positions = torch.arange(offset, offset + q.shape[1], device=q.device)
        angles = positions.to(acc).unsqueeze(-1) * self.inv_freq.to(device=q.device, dtype=acc)
        # (..., S, 1, D/2): broadcasts over heads, and over batch for (S,) positions
        cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"
