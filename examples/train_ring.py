"""Train the small GPT of examples/train_gpt.py with its sequence sharded over
N processes (context parallelism): every rank holds S/N positions of each
sequence, and attention runs as selfattn.distributed.ring_attention.

    torchrun --nproc-per-node 2 examples/train_ring.py --compare   # on CPU (gloo)
    torchrun --nproc-per-node 4 examples/train_ring.py --layout contiguous

Only attention mixes positions: embeddings, MLPs, norms and the loss are per
token, so a rank runs them on its shard; rotary embeddings take the shard's
global positions. The loss is the whole batch's mean (a sum of the ranks'
token losses, all-reduced), and the parameter gradients are summed over the
ranks, so every rank takes the same optimizer step as one process on the
whole sequence. --compare trains that one process too (on rank 0, same
seed and batches) and prints both curves: they differ by rounding only.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfattn import distributed as sad
from selfattn import nn as sa
from train_gpt import GPT, load_text


class RingCausalSelfAttention(sa.CausalSelfAttention):
    """CausalSelfAttention (same parameters) on a sequence shard: rotary at
    the shard's global positions, attention around the ring."""

    layout = "zigzag"
    positions = None  # the shard's global positions, set before each forward

    def forward(self, x, key_lengths=None):
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))
        q, k = self.rotary(q, k, positions=RingCausalSelfAttention.positions)
        out = sad.ring_attention(q, k, v, causal=True, layout=RingCausalSelfAttention.layout)
        return self.out_proj(out.flatten(2))


def train(args, sharded: bool):
    """Trains from args.seed; returns the loss (the whole batch's mean) per step."""
    data, chars = load_text()
    torch.manual_seed(args.seed)
    model = GPT(len(chars), args.d_model, args.n_head, args.n_layer,
                RingCausalSelfAttention if sharded else sa.CausalSelfAttention)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches on every rank
    positions = torch.arange(args.block)
    if sharded:
        RingCausalSelfAttention.layout = args.layout
        RingCausalSelfAttention.positions = sad.shard_sequence(positions, layout=args.layout,
                                                               dim=0)
    losses = []
    for _ in range(args.steps):
        start = torch.randint(0, len(data) - args.block - 1, (args.batch,), generator=batches)
        idx = start.unsqueeze(1) + torch.arange(args.block + 1)
        x, y = data[idx[:, :-1]], data[idx[:, 1:]]
        if sharded:
            x, y = (sad.shard_sequence(t, layout=args.layout) for t in (x, y))
        loss_sum = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
        loss = loss_sum / (args.batch * args.block)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sharded:  # the whole batch's gradient and loss: sums over the ranks
            for p in model.parameters():
                dist.all_reduce(p.grad)
            total = loss_sum.detach().clone()
            dist.all_reduce(total)
            loss = total / (args.batch * args.block)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--layout", choices=sad.LAYOUTS, default="zigzag")
    p.add_argument("--compare", action="store_true",
                   help="also train one process on the whole sequence (rank 0) and compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64, help="context length (split over ranks)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--json", help="write the loss curves to this file (rank 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        curves = {f"ring ({world} ranks)": train(args, sharded=True)}
        if rank == 0:
            if args.compare:
                curves["one process"] = train(args, sharded=False)
            names = list(curves)
            print("step  " + "  ".join(f"{n:>16}" for n in names))
            for i in range(0, args.steps, max(1, args.steps // 20)):
                print(f"{i + 1:4d}  " + "  ".join(f"{curves[n][i]:16.4f}" for n in names))
            if args.compare:
                a, b = curves.values()
                print(f"max |loss difference| over {args.steps} steps: "
                      f"{max(abs(x - y) for x, y in zip(a, b)):.2e}")
            if args.json:
                Path(args.json).write_text(json.dumps(curves))
        dist.barrier()  # no rank tears the group down while another is still in it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
