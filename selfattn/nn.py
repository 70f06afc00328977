"""nn.Module layers on selfattn's fused attention (`from selfattn import nn as sa`).

Drop-ins for torch's layers: `MultiheadAttention`, `TransformerEncoderLayer`,
`TransformerDecoderLayer`, `TransformerEncoder`, `TransformerDecoder` subclass
torch's classes, so constructors, parameter names, initialisation and
state_dicts are torch's own; only the attention runs through
`selfattn.attention` ((B, S, H, D) views of the projections, no copies) and,
for need_weights, `selfattn.attention_weights` from the forward's logsumexp.
torch's masks (True = NOT allowed, float = added) are translated to the
kernel's arguments: a suffix key padding becomes `key_lengths`, is_causal
becomes the kernel's causal flag, anything else one broadcast mask.

Further layers with selfattn's own conventions (bool masks True = takes part,
batch-first (B, S, E) inputs): `SelfAttention`, `CausalSelfAttention`,
`LocalSelfAttention`, `HierarchicalSelfAttention`, `AdditiveAttention`,
`SinusoidalPositionalEncoding`, `RotaryEmbedding`.

One difference from torch everywhere: a query that sees no key at all gets 0
(torch gives NaN).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from .functional import attention, attention_weights

__all__ = [
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerDecoder", "SelfAttention", "CausalSelfAttention",
    "LocalSelfAttention", "HierarchicalSelfAttention", "AdditiveAttention",
    "SinusoidalPositionalEncoding", "RotaryEmbedding",
]


# ---------------------------------------------------------------------------
# torch-convention masks -> kernel arguments


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _suffix_lengths(key_padding_mask: Tensor) -> Optional[Tensor]:
    """(N,) key lengths when the bool (N, S) padding mask (True = padding) pads
    exactly a suffix of every row, else None. Reads the mask on the host, so it
    is skipped under torch.compile (the caller then uses a mask)."""
    if _is_compiling():
        return None
    S = key_padding_mask.shape[1]
    lengths = S - key_padding_mask.sum(1)
    suffix = torch.arange(S, device=key_padding_mask.device) >= lengths.unsqueeze(1)
    return lengths if torch.equal(suffix, key_padding_mask) else None


def _torch_mask_to_selfattn(mask: Tensor, pad: int) -> Tensor:
    """A torch-convention mask (bool True = not allowed, or float added) as a
    selfattn one (bool True = takes part, or float), with `pad` always-visible
    key columns appended (bias_k / zero-attention keys)."""
    if mask.dtype == torch.bool:
        return F.pad(~mask, (0, pad), value=True) if pad else ~mask
    return F.pad(mask, (0, pad), value=0.0) if pad else mask


def _merge_masks(a: Optional[Tensor], b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Combines two selfattn-convention masks (broadcasting): bool & bool stays
    bool, otherwise the bool one becomes 0 / -inf and the two are added."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b

    def as_float(m):
        if m.dtype != torch.bool:
            return m.to(dtype)
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))

    return as_float(a) + as_float(b)


def _fork_default_generator(device: torch.device) -> torch.Generator:
    """A generator in the current state of torch's default one on `device`, so
    attention_weights redraws the dropout mask the forward is about to draw."""
    fork = torch.Generator(device=device)
    if device.type == "cuda":
        fork.set_state(torch.cuda.default_generators[device.index or 0].get_state())
    else:
        fork.set_state(torch.default_generator.get_state())
    return fork


# ---------------------------------------------------------------------------
# torch.nn drop-ins


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on selfattn's fused kernel.

    Same constructor, parameters (in_proj_weight or q/k/v_proj_weight,
    in_proj_bias, out_proj, bias_k, bias_v), initialisation and state_dict as
    torch's; forward has torch's signature and masks:

    Args (forward):
        query: (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E).
        key: (S, N, kdim) / (N, S, kdim) / (S, kdim). value: same with vdim.
        key_padding_mask: (N, S) or (S,) unbatched; bool True = padding, or
            float added to the scores. A bool mask that pads a suffix of each
            row runs as per-batch key lengths.
        need_weights: also return the attention probabilities, computed by
            `selfattn.attention_weights` from the forward's logsumexp (they
            carry no gradient; in training with dropout they are the dropped-out
            ones, as torch's).
        attn_mask: (L, S) or (N * num_heads, L, S); bool True = not allowed, or
            float added.
        average_attn_weights: average the weights over heads.
        is_causal: hint that attn_mask is the causal mask; as in torch it
            requires attn_mask, and the kernel then applies the causal mask
            itself (top-left aligned) without reading attn_mask.

    Returns:
        (attn_output, attn_weights): output shaped like query with embed_dim
        features; weights (N, L, S') averaged or (N, num_heads, L, S') (S' = S
        plus bias_k and zero-attention keys), without the batch dim for
        unbatched input, or None when need_weights is False. Queries that see no
        key give 0 (torch: NaN).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        fn = "selfattn.nn.MultiheadAttention"
        batched = self._check_inputs(fn, query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
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
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
            extra += 1
        S = k.shape[1]
        q, k, v = (t.unflatten(-1, (H, self.head_dim)) for t in (q, k, v))

        # With a truthful hint the causal flag equals attn_mask. With appended
        # keys torch itself differs by path: its SDPA path (no key_padding_mask,
        # no weights) applies top-left causality to them too, its other path
        # pads attn_mask so that every query sees them; both are mirrored.
        causal = is_causal and (extra == 0 or (key_padding_mask is None and not need_weights))
        mask, key_lengths = None, None
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
        masking = dict(causal=causal, causal_alignment="top_left", attn_mask=mask,
                       key_lengths=key_lengths)
        dropout_p = self.dropout if self.training else 0.0
        weights_generator = None
        if need_weights and dropout_p > 0:
            weights_generator = _fork_default_generator(q.device)
        out, lse = attention(q, k, v, dropout_p=dropout_p, return_lse=True, **masking)
        # (N, L, H, D) -> query's layout, one copy, then the output projection.
        out = out.flatten(2) if (self.batch_first or not batched) else out.transpose(0, 1).flatten(2)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        weights = None
        if need_weights:
            weights = attention_weights(q, k, dropout_p=dropout_p, generator=weights_generator,
                                        lse=lse, **masking)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _check_inputs(self, fn, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape checks, as ValueErrors naming the argument; returns
        whether the input is batched."""
        if query.dim() not in (2, 3):
            raise ValueError(f"{fn}: query must be (L, E) unbatched or 3-D batched, got shape "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim():
                raise ValueError(f"{fn}: {name} must be {query.dim()}-D like query, got shape "
                                 f"{tuple(t.shape)}")
            if t.shape[-1] != dim:
                raise ValueError(f"{fn}: {name} must have {dim} features, got {t.shape[-1]}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"{fn}: query must have embed_dim={self.embed_dim} features, got "
                             f"{query.shape[-1]}")
        seq = 1 if (batched and self.batch_first) else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} must "
                             "agree in batch and sequence length")
        if batched and key.shape[1 - seq] != query.shape[1 - seq]:
            raise ValueError(f"{fn}: key has batch size {key.shape[1 - seq]}, query "
                             f"{query.shape[1 - seq]}")
        N = query.shape[1 - seq] if batched else 1
        L, S = query.shape[seq], key.shape[seq]
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"{fn}: key_padding_mask must have shape {expected}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise TypeError(f"{fn}: key_padding_mask must be bool or float, got "
                                f"{key_padding_mask.dtype}")
        if attn_mask is not None:
            allowed = ((L, S), (N * self.num_heads, L, S))
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(f"{fn}: attn_mask must have shape (L, S) = {allowed[0]} or "
                                 f"(N * num_heads, L, S) = {allowed[1]}, got "
                                 f"{tuple(attn_mask.shape)}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"{fn}: attn_mask must be bool or float, got {attn_mask.dtype}")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """In-projections of (N, L|S, *) inputs to (N, L|S, E); self-attention
        runs one packed matmul and returns views of its output."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        if key is value:
            kv = F.linear(key, w[E:], None if b is None else b[E:])
            return (F.linear(query, w[:E], bq),) + kv.chunk(2, dim=-1)
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


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
    fast path (which would bypass the kernel) is not taken.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_fused(self.self_attn)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
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
        raise ValueError(f"{fn}: {name} must be (B, S, {features}), got shape {tuple(x.shape)}")


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
            raise ValueError(f"selfattn.nn.SelfAttention: x must be (B, S, D), got shape "
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
            raise ValueError(f"{self._name}: embed_dim {embed_dim} is not divisible by num_heads "
                             f"{num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"{self._name}: num_kv_heads {num_kv_heads} must divide num_heads "
                             f"{num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self._name}: dropout must be in [0, 1), got {dropout}")
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

    def forward(self, x: Tensor, key_lengths: Optional[Tensor] = None) -> Tensor:
        return self._attend(x, key_lengths, causal=True)


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
            raise ValueError(f"{self._name}: window must be an int >= 0 or a pair of them, got "
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
            raise ValueError(f"selfattn.nn.HierarchicalSelfAttention: segment_len must be >= 1, "
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
        raise ValueError(f"{fn}: ku must be (B, Sk, A) = ({B}, Sk, {A}), got {tuple(ku.shape)}")
    if v.dim() != 3 or v.shape[:2] != ku.shape[:2]:
        raise ValueError(f"{fn}: v must be (B, Sk, Dv) with (B, Sk) = {tuple(ku.shape[:2])}, got "
                         f"{tuple(v.shape)}")
    if w.shape != (A,):
        raise ValueError(f"{fn}: w must have shape ({A},), got {tuple(w.shape)}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: attn_mask must be bool (True = takes part), got {attn_mask.dtype}")
        attn_mask = attn_mask.expand(B, Sq, ku.shape[1])
    if key_lengths is not None and tuple(key_lengths.shape) != (B,):
        raise ValueError(f"{fn}: key_lengths must have shape ({B},), got {tuple(key_lengths.shape)}")
    if chunk_size is None:
        chunk_size = max(1, 2**22 // max(1, B * Sq * A))
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
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
            raise ValueError(f"selfattn.nn.SinusoidalPositionalEncoding: offset + sequence length "
                             f"{offset + S} exceeds max_len {self.pe.shape[0]}")
        pe = self.pe[offset:offset + S].to(x.dtype)
        return self.dropout(x + (pe if self.batch_first else pe.unsqueeze(1)))


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
            raise ValueError(f"selfattn.nn.RotaryEmbedding: head_dim must be even, got {head_dim}")
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
                raise ValueError(f"{fn}: {name} must be (B, S, H, {self.head_dim}), got shape "
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
