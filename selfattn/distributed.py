"""Context-parallel (ring) attention over torch.distributed.

Each rank holds a shard of the sequence (B, S/world, H, D) of q, k and v. The
key/value shards travel around the ring of ranks; every rank attends its
queries to each block as it passes, with selfattn's forward op on the block
(its visibility, ALiBi bias and dropout placed by the block's global offsets:
diag_offset, q_start, k_start), and merges the partial results through their
logsumexp. The backward runs the same ring: each rank's backward op on
(its queries, the passing block) with the merged output and logsumexp gives
exact gradient contributions; dK and dV travel with their block (float32)
and are home after a full turn. Each step's send/receive overlaps its
compute (batch_isend_irecv).

    layout="contiguous": rank r holds positions [r n, (r + 1) n), n = S / world
    layout="zigzag":     the sequence in 2 world chunks of n / 2; rank r holds
                         chunks r and 2 world - 1 - r (equal causal work per rank)

`shard_sequence` / `gather_sequence` cut a full tensor into this rank's shard
and put the shards back together. Dropout draws the single-process op's mask
whatever the number of ranks (one (seed, offset), broadcast from rank 0, and
global positions). Ranks whose shapes disagree all raise the same error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._args import FLOAT_DTYPES, attention_args, window_sides
from .errors import ArgumentError, ArgumentTypeError
from .functional import rng_state
from . import ops

__all__ = ["ring_attention", "shard_sequence", "gather_sequence"]

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """Rows [local, local + length) of a shard are positions [start, start + length)."""
    local: int
    start: int
    length: int


def segments(layout: str, rank: int, world: int, n: int) -> List[Segment]:
    """The segments of rank `rank`'s shard of n positions."""
    if layout == "contiguous":
        return [Segment(0, rank * n, n)]
    c = n // 2
    return [Segment(0, rank * c, c), Segment(c, (2 * world - 1 - rank) * c, c)]


def shard_sequence(x: Tensor, group=None, *, layout: str = "contiguous", dim: int = 1) -> Tensor:
    """This rank's shard of the full sequence `x` (along `dim`)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    S = x.shape[dim]
    _check_layout("selfattn.distributed.shard_sequence", layout, S, world)
    n = S // world
    return torch.cat([x.narrow(dim, s.start, s.length) for s in segments(layout, rank, world, n)],
                     dim)


def gather_sequence(x: Tensor, group=None, *, layout: str = "contiguous", dim: int = 1) -> Tensor:
    """The full sequence from every rank's shard `x` (all ranks get it)."""
    world = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    n = x.shape[dim]
    pieces = [(s.start, shard.narrow(dim, s.local, s.length))
              for r, shard in enumerate(shards) for s in segments(layout, r, world, n)]
    return torch.cat([p for _, p in sorted(pieces, key=lambda sp: sp[0])], dim)


def _check_layout(fn: str, layout: str, S: int, world: int) -> None:
    if layout not in LAYOUTS:
        raise ArgumentError(f"{fn}: layout must be 'contiguous' or 'zigzag', got {layout!r}")
    parts = world * (2 if layout == "zigzag" else 1)
    if S % parts:
        raise ArgumentError(f"{fn}: the sequence length {S} must split into {parts} equal "
                            f"chunks for layout={layout!r} on {world} ranks")


@dataclass(frozen=True)
class _Spec:
    """What every block call of one ring_attention shares."""
    group: object
    world: int
    rank: int
    layout: str
    n: int  # positions per shard
    scale: float
    window_left: int  # -1 = unbounded, in global positions
    window_right: int
    dropout_p: float
    mask_grad: bool

    def pairs(self, src: int):
        """(query segment, key segment) pairs of this rank's queries and rank
        src's keys that share a visible element."""
        for qs in segments(self.layout, self.rank, self.world, self.n):
            for ks in segments(self.layout, src, self.world, self.n):
                off = qs.start - ks.start  # key j visible to query i: i + off - left <= j <= i + off + right
                lo = off - self.window_left if self.window_left >= 0 else -math.inf
                hi = qs.length - 1 + off + self.window_right if self.window_right >= 0 else math.inf
                if hi >= 0 and lo <= ks.length - 1:
                    yield qs, ks

    def block_args(self, qs: Segment, ks: Segment, mask: Optional[Tensor],
                   key_lengths: Optional[Tensor]):
        """The block's mask slice and key lengths, and the scalar arguments of the ops."""
        if mask is not None:
            rows = mask if mask.shape[-2] == 1 else mask.narrow(-2, qs.start, qs.length)
            mask = rows if rows.shape[-1] == 1 else rows.narrow(-1, ks.start, ks.length)
        if key_lengths is not None:
            key_lengths = (key_lengths - ks.start).clamp(0, ks.length)
        return mask, key_lengths, (self.scale, self.window_left, self.window_right,
                                   qs.start - ks.start, self.dropout_p, None, 0.0, qs.start,
                                   ks.start)


def _ring_exchange(spec: _Spec, tensors: List[Tensor]):
    """Starts sending `tensors` to the next rank and receiving the previous
    rank's into new buffers; returns (buffers, requests)."""
    group = spec.group
    to = dist.get_global_rank(group, (spec.rank + 1) % spec.world) if group else \
        (spec.rank + 1) % spec.world
    frm = dist.get_global_rank(group, (spec.rank - 1) % spec.world) if group else \
        (spec.rank - 1) % spec.world
    bufs = [torch.empty_like(t) for t in tensors]
    p2p = [dist.P2POp(dist.isend, t, to, group) for t in tensors] + \
        [dist.P2POp(dist.irecv, b, frm, group) for b in bufs]
    return bufs, dist.batch_isend_irecv(p2p)


def _merge(out: Tensor, lse: Tensor, part: Tensor, part_lse: Tensor) -> None:
    """out, lse (float32/64 accumulators of one query segment) += a partial
    result, through the logsumexp: in place."""
    new = torch.logaddexp(lse, part_lse)
    seen = new > -math.inf  # rows that saw no key yet stay 0
    w_old = torch.where(seen, torch.exp(lse - new), 0.0).transpose(1, 2).unsqueeze(-1)
    w_new = torch.where(seen, torch.exp(part_lse - new), 0.0).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(part.to(out.dtype) * w_new)
    lse.copy_(new)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, key_lengths, rng, spec: _Spec):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, n, Hq, _ = q.shape
        Dv = v.shape[-1]
        out = q.new_zeros((B, n, Hq, Dv), dtype=acc)
        lse = q.new_full((B, Hq, n), -math.inf, dtype=acc)
        kv = [k.contiguous(), v.contiguous()]
        for step in range(spec.world):
            src = (spec.rank - step) % spec.world
            if step + 1 < spec.world:
                incoming, requests = _ring_exchange(spec, kv)
            for qs, ks in spec.pairs(src):
                m, kl, scalars = spec.block_args(qs, ks, mask, key_lengths)
                part, part_lse = ops.forward_op(
                    q.narrow(1, qs.local, qs.length), kv[0].narrow(1, ks.local, ks.length),
                    kv[1].narrow(1, ks.local, ks.length), m, kl, rng, *scalars)
                rows = slice(qs.local, qs.local + qs.length)
                _merge(out[:, rows], lse[:, :, rows], part, part_lse)
            if step + 1 < spec.world:
                for r in requests:
                    r.wait()
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask, key_lengths, rng)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, key_lengths, rng = ctx.saved_tensors
        spec: _Spec = ctx.spec
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        # the passing block: k, v and the float32 dK, dV summed so far
        block = [k.contiguous(), v.contiguous(), torch.zeros(k.shape, dtype=acc, device=k.device),
                 torch.zeros(v.shape, dtype=acc, device=v.device)]
        for step in range(spec.world):
            src = (spec.rank - step) % spec.world
            if step + 1 < spec.world:  # the next block's k, v travel during this step
                incoming, requests = _ring_exchange(spec, block[:2])
            for qs, ks in spec.pairs(src):
                m, kl, scalars = spec.block_args(qs, ks, mask, key_lengths)
                rows = slice(qs.local, qs.local + qs.length)
                keys = slice(ks.local, ks.local + ks.length)
                dq_b, dk_b, dv_b, _ = ops.backward_op(
                    dout[:, rows], q[:, rows], block[0][:, keys], block[1][:, keys],
                    out[:, rows], lse[:, :, rows].contiguous(), m, kl, rng, *scalars, False)
                dq[:, rows] += dq_b
                block[2][:, keys] += dk_b
                block[3][:, keys] += dv_b
            grads, grad_requests = _ring_exchange(spec, block[2:]) if spec.world > 1 \
                else (block[2:], [])
            for r in grad_requests + (requests if step + 1 < spec.world else []):
                r.wait()
            block = (incoming if step + 1 < spec.world else block[:2]) + grads
        return (dq.to(q.dtype), block[2].to(k.dtype), block[3].to(v.dtype), None, None, None,
                None)


def _window(fn: str, window, causal: bool, S: int) -> Tuple[int, int]:
    """(left, right) of `window` in the whole sequence's positions (-1:
    unbounded; a side of 2 S or more bounds nothing); causal sets right = 0."""
    left, right = window_sides(fn, window, causal)
    return (-1 if left >= 2 * S else left), (-1 if right >= 2 * S else right)


def _agree(fn: str, group, meta: List[int], device: torch.device) -> None:
    """Raises on every rank unless every rank passed the same `meta` (a tensor
    on `device`, the one the group's backend communicates)."""
    mine = torch.tensor(meta, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    if any(r != rows[0] for r in rows):
        raise ArgumentError(f"{fn}: the ranks' arguments disagree (B, S/world, Hq, Hkv, D, Dv, "
                            f"dtype, layout, causal, window, dropout, mask, key_lengths): "
                            + "; ".join(f"rank {i}: {r}" for i, r in enumerate(rows)))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, *, causal: bool = False,
                   window=None, scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                   key_lengths: Optional[Tensor] = None, dropout_p: float = 0.0,
                   generator: Optional[torch.Generator] = None, layout: str = "contiguous",
                   return_lse: bool = False):
    """selfattn.attention over a sequence sharded across the ranks of `group`.

    Args:
        q, k, v: this rank's shards, (B, S/world, Hq, D), (B, S/world, Hkv, D),
            (B, S/world, Hkv, Dv), as `shard_sequence` cuts them (`layout`).
        causal, window, scale, dropout_p, generator: as selfattn.attention,
            in positions of the whole sequence (of S queries and S keys, so
            the causal alignments coincide).
        attn_mask: the whole sequence's mask (every rank passes the same),
            broadcastable to (B, Hq, S, S), bool or float without gradient;
            each block reads its slice.
        key_lengths: (B,) int, in positions of the whole sequence.
        layout: "contiguous" or "zigzag" (see the module docstring).

    Returns:
        this rank's shard of the output (B, S/world, Hq, Dv) [, its lse
        (B, Hq, S/world)]; gradients flow to q, k, v of every rank.
    """
    fn = "selfattn.distributed.ring_attention"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_layout(fn, layout, q.shape[1] * world if isinstance(q, Tensor) else 0, world)
    # checks of the shards; window and mask are in the whole sequence's positions
    a = attention_args(fn, q, k, v, causal, "top_left", None, scale, None, key_lengths, dropout_p)
    _, n, Hq, D = q.shape
    S = n * world
    if k.shape[1] != n:
        raise ArgumentError(f"{fn}: k has {k.shape[1]} positions per rank, q {n}: ring attention "
                            "shards one sequence of queries and keys")
    left, right = _window(fn, window, causal, S)
    if attn_mask is not None:
        target = (q.shape[0], Hq, S, S)
        shape = tuple(attn_mask.shape)
        if not isinstance(attn_mask, Tensor) or len(shape) > 4 or any(
                s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ArgumentError(f"{fn}: attn_mask must be a tensor broadcastable to the whole "
                                f"sequence's (B, Hq, S, S) = {target}")
        if attn_mask.requires_grad:
            raise ArgumentTypeError(f"{fn}: a float attn_mask that requires grad is not "
                                    "supported (its gradient would be spread over the ranks)")
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
    _agree(fn, group, [*q.shape, k.shape[2], v.shape[-1], FLOAT_DTYPES.index(q.dtype),
                       LAYOUTS.index(layout), int(causal), left, right,
                       int(round(a.dropout_p * 1e9)), attn_mask is not None,
                       key_lengths is not None], q.device)
    rng = rng_state(a.dropout_p, q.device, generator)
    if rng is not None:  # one (seed, offset) for every rank: the single-process mask
        dist.broadcast(rng, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    spec = _Spec(group, world, rank, layout, n, a.scale, left, right, a.dropout_p, False)
    out, lse = _RingAttention.apply(q, k, v, attn_mask, a.key_lengths, rng, spec)
    return (out, lse) if return_lse else out
