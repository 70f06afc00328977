"""Train a small character-level GPT built from selfattn.nn on a text that ships
with the repo (examples/data/lighthouse.txt), on CPU.

    python examples/train_gpt.py                  # 300 steps, selfattn attention
    python examples/train_gpt.py --compare        # also torch's SDPA, same seed; both curves
    python examples/train_gpt.py --ddp --steps 50 # DistributedDataParallel, gloo, 2 processes

The model: token embedding, pre-norm blocks of selfattn.nn.CausalSelfAttention
(fused qkv, rotary positions) and an MLP, a tied output head. --compare trains
the same model from the same seed and batches with the attention swapped for
torch.nn.functional.scaled_dot_product_attention (dropout is off, so the two
curves differ only by floating-point rounding) and prints both.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from selfattn import nn as sa

DATA = Path(__file__).resolve().parent / "data" / "lighthouse.txt"


class TorchCausalSelfAttention(sa.CausalSelfAttention):
    """The same layer (same parameters) on torch's SDPA, for --compare."""

    def forward(self, x, key_lengths=None):
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))
        q, k = self.rotary(q, k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Block(torch.nn.Module):
    def __init__(self, d_model, n_head, attn_cls):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.attn = attn_cls(d_model, n_head, rotary=True)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    """Character-level GPT: ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, vocab, d_model=64, n_head=4, n_layer=2, attn_cls=sa.CausalSelfAttention):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        torch.nn.init.normal_(self.embed.weight, std=0.02)  # tied head: keep first logits small
        self.blocks = torch.nn.Sequential(*[Block(d_model, n_head, attn_cls) for _ in range(n_layer)])
        self.ln_f = torch.nn.LayerNorm(d_model)

    def forward(self, ids):
        x = self.ln_f(self.blocks(self.embed(ids)))
        return x @ self.embed.weight.T


def load_text():
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    return ids, chars


def train(attn_cls, args, rank=0, world=1):
    """Trains from args.seed; returns the loss after each step (on rank 0 with
    DDP: this rank's loss; the parameters stay in sync across ranks)."""
    data, chars = load_text()
    torch.manual_seed(args.seed)
    model = GPT(len(chars), args.d_model, args.n_head, args.n_layer, attn_cls)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(args.seed + 1000 * rank)  # one data shard per rank
    losses = []
    for _ in range(args.steps):
        start = torch.randint(0, len(data) - args.block - 1, (args.batch,), generator=batches)
        idx = start.unsqueeze(1) + torch.arange(args.block + 1)
        x, y = data[idx[:, :-1]], data[idx[:, 1:]]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if world > 1:
        check_in_sync(model)
    return losses


def check_in_sync(model):
    """Raises unless every rank holds the same parameters."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(gathered[0], g) for g in gathered):
        raise RuntimeError("DDP ranks ended with different parameters")


def run(args, rank=0, world=1):
    curves = {"selfattn": train(sa.CausalSelfAttention, args, rank, world)}
    if args.compare:
        curves["torch"] = train(TorchCausalSelfAttention, args, rank, world)
    if rank != 0:
        return
    names = list(curves)
    print("step  " + "  ".join(f"{n:>9}" for n in names))
    for i in range(0, args.steps, max(1, args.steps // 20)):
        print(f"{i + 1:4d}  " + "  ".join(f"{curves[n][i]:9.4f}" for n in names))
    if args.compare:
        diff = max(abs(a - b) for a, b in zip(curves["selfattn"], curves["torch"]))
        print(f"max |loss difference| over {args.steps} steps: {diff:.2e}")
    if world > 1:
        print(f"ddp: {world} processes, parameters in sync")
    if args.json:
        Path(args.json).write_text(json.dumps(curves))


def _ddp_worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(args, rank, world)
        dist.barrier()  # no rank tears the group down while another is still in it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--compare", action="store_true", help="also train with torch's attention")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel, gloo, 2 processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64, help="context length")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--json", help="write the loss curves to this file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.ddp:
        mp.spawn(_ddp_worker, args=(2, _free_port(), args), nprocs=2, join=True)
    else:
        run(args)


if __name__ == "__main__":
    main()
