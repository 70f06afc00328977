"""selfattn.distributed.ring_attention on 2 and 4 CPU processes (gloo): each
rank's output shard and the gradients of its q, k, v shards, gathered, must
match the whole sequence's attention within DESIGN.md's bound (float64
selfattn.reference as golden, the same-dtype reference's error as the scale),
for causal and not, both layouts, GQA, windows, key lengths, a mask, D != Dv,
bfloat16; dropout must draw the single-process op's mask; ranks whose shapes
disagree must all raise, not hang.
"""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfattn
from selfattn import distributed as sad
from selfattn import reference
from selfattn.testing import assert_close_to_golden

CASES = [
    dict(name="plain"),
    dict(name="causal", causal=True),
    dict(name="causal_zigzag", causal=True, layout="zigzag"),
    dict(name="gqa_zigzag", causal=True, layout="zigzag", Hkv=1, Dv=24),
    dict(name="window", window=(5, 3)),
    dict(name="causal_window_zigzag", causal=True, window=(9, 0), layout="zigzag"),
    dict(name="key_lengths", key_lengths=(13, 31), causal=True),
    dict(name="bool_mask", mask=True),
    dict(name="bfloat16_causal_zigzag", causal=True, layout="zigzag", dtype=torch.bfloat16),
    dict(name="dropout", dropout_p=0.3, causal=True, layout="zigzag"),
]


def _inputs(case, world, S=32):
    """The whole sequence's q, k, v and options (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    B, Hq, D = 2, 4, 16
    Hkv, Dv = case.get("Hkv", Hq), case.get("Dv", D)
    dtype = case.get("dtype", torch.float32)
    q, k, v = (torch.randn(B, S, h, d, generator=g).to(dtype)
               for h, d in ((Hq, D), (Hkv, D), (Hkv, Dv)))
    kw = dict(causal=case.get("causal", False), window=case.get("window"),
              dropout_p=case.get("dropout_p", 0.0))
    if "key_lengths" in case:
        kw["key_lengths"] = torch.tensor(case["key_lengths"])
    if case.get("mask"):
        mask = torch.rand(1, Hq, S, S, generator=g) < 0.7
        mask[..., 0] = True
        kw["attn_mask"] = mask
    return q, k, v, kw


def _whole(q, k, v, kw, dout, dtype, kept=None):
    """reference.attention on the whole sequence in `dtype`: out and grads."""
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference.attention(*xs, **kw, dropout_mask=kept)
    grads = torch.autograd.grad(out, xs, dout.to(dtype))
    return [out.detach()] + list(grads)


def _check_case(case, rank, world):
    layout = case.get("layout", "contiguous")
    q, k, v, kw = _inputs(case, world)
    g = torch.Generator().manual_seed(11)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g).to(q.dtype)
    shards = [sad.shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
    gen = torch.Generator().manual_seed(5) if kw["dropout_p"] else None
    out = sad.ring_attention(*shards, layout=layout, generator=gen, **kw)
    out.backward(sad.shard_sequence(dout, layout=layout))
    ours = [sad.gather_sequence(t, layout=layout) for t in (out.detach(), *[s.grad for s in shards])]
    kept = None
    if kw["dropout_p"]:  # the single-process op's kept elements for the same generator seed
        single = selfattn.attention(q, k, v, generator=torch.Generator().manual_seed(5), **kw)
        opts = {n: kw[n] for n in ("causal", "window", "dropout_p")}
        weights = selfattn.attention_weights(q, k, generator=torch.Generator().manual_seed(5),
                                             **opts)
        kept = weights != 0
        torch.testing.assert_close(ours[0], single, rtol=1e-5, atol=1e-5)
    if rank == 0:
        golden = _whole(q, k, v, kw, dout, torch.float64, kept)
        lowp = _whole(q, k, v, kw, dout, q.dtype, kept)
        for name, o, lp, gd in zip(("out", "dq", "dk", "dv"), ours, lowp, golden):
            assert_close_to_golden(f"{case['name']} {name} (world {world})", o, lp, gd)


def _worker(rank, world, port, cases, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            try:
                _check_case(case, rank, world)
            except Exception:  # noqa: BLE001 (reported to the parent, which fails the test)
                failures.put(f"rank {rank}, {case['name']}:\n{traceback.format_exc()}")
        # shapes that disagree: every rank raises instead of waiting for the others
        n = 8 + (rank == world - 1)
        q = torch.randn(1, n, 2, 8)
        try:
            sad.ring_attention(q, q, q)
            failures.put(f"rank {rank}: disagreeing shapes did not raise")
        except ValueError as e:
            if "disagree" not in str(e):
                failures.put(f"rank {rank}: unexpected error {e}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_the_whole_sequence(world):
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), CASES, failures), nprocs=world,
                       join=True, start_method="spawn")
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, "\n".join(errors)


def test_layouts_round_trip_and_refuse_bad_lengths():
    """shard_sequence / gather_sequence without a process group: one rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x = torch.randn(2, 12, 3)
        for layout in ("contiguous", "zigzag"):
            assert torch.equal(sad.gather_sequence(sad.shard_sequence(x, layout=layout),
                                                   layout=layout), x)
        with pytest.raises(ValueError, match="must split into 2 equal chunks"):
            sad.shard_sequence(torch.randn(2, 11, 3), layout="zigzag")
        with pytest.raises(ValueError, match="layout must be"):
            sad.shard_sequence(x, layout="striped")
        q = torch.randn(1, 8, 2, 8, requires_grad=True)
        out = sad.ring_attention(q, q, q, causal=True)
        torch.testing.assert_close(out, selfattn.attention(q, q, q, causal=True))
    finally:
        dist.destroy_process_group()
