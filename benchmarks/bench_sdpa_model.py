"""A real model's training step with torch's own SDPA flash kernel against the
same model with selfattn active as that kernel (selfattn.enable_sdpa(), the
model's code untouched), in one process, interleaved, medians
(selfattn._measure.median_seconds: torch.utils.benchmark).

The model: a LLaMA-architecture causal LM from Hugging Face transformers
(config only, random weights, attn_implementation="sdpa") sized like GPT-2
small: 12 layers, hidden 768, 12 heads of 64, MLP 3072, vocabulary 32000.
One step = forward, loss, backward (no optimizer), batch 1.

    python benchmarks/bench_sdpa_model.py            # S = 512, 1024, 2048; float32, bfloat16
    python benchmarks/bench_sdpa_model.py --quick    # S = 512, float32

Writes <out>/sdpa_model.md (default benchmarks/results) and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

import selfattn
from selfattn import ops
from selfattn._measure import cpu_name, median_seconds


def make_model(dtype: torch.dtype):
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=3072, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    return model.train()


def step_fn(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    return step


def with_selfattn(fn):
    def run():
        selfattn.enable_sdpa()
        try:
            fn()
        finally:
            selfattn.disable_sdpa()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    lengths = [512] if args.quick else [512, 1024, 2048]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        model = make_model(dtype)
        for S in lengths:
            ids = torch.randint(0, 32000, (1, S), generator=torch.Generator().manual_seed(S))
            step = step_fn(model, ids)
            t = median_seconds({"torch": step, "selfattn": with_selfattn(step)},
                               rounds=args.rounds, min_run_time=0.5)
            rows.append((str(dtype).replace("torch.", ""), S, t["torch"], t["selfattn"]))
            print(f"{rows[-1][0]} S={S}: torch {t['torch'] * 1e3:.0f} ms, selfattn "
                  f"{t['selfattn'] * 1e3:.0f} ms, ratio {t['selfattn'] / t['torch']:.2f}",
                  flush=True)
    lines = [
        "# A model's training step: torch's SDPA flash kernel vs selfattn active in its place",
        "",
        f"{datetime.date.today()}, {cpu_name()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, selfattn CPU module `{ops.CPU_KERNELS}`.",
        "LLaMA-architecture causal LM sized like GPT-2 small (12 layers, hidden 768, 12 heads "
        "of 64, MLP 3072, vocabulary 32000), random weights, batch 1; one step = forward, loss "
        "and backward. Medians of interleaved runs (torch.utils.benchmark).",
        "",
        "| dtype | S | torch (ms) | selfattn active (ms) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {d} | {S} | {a * 1e3:.0f} | {b * 1e3:.0f} | {b / a:.2f} |"
              for d, S, a, b in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sdpa_model.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
