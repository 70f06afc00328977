"""Hostile-input fuzzer of selfattn's Python API and raw ops (issue #6).

A seeded fuzzer calls selfattn.attention, scaled_dot_product_attention,
attention_weights and the raw torch.ops.selfattn ops (forward, backward,
probs) with arguments that are valid or, with some probability each, replaced
by a hostile value: None, ints, floats (nan, inf), strings, lists, tensors of
the wrong dtype / rank / device ('meta') / shape, non-contiguous or expanded
tensors, absurd windows (-7, 10**12), scale=nan, dropout_p=1.0, key_lengths
negative or huge, masks of the wrong rank or shape, generators of the wrong
type. Every call must either return a result (checked against the reference
when the reference accepts the same arguments) or raise ValueError, TypeError,
RuntimeError or IndexError with a non-empty message.

The fuzzer runs in a subprocess with a timeout, so a segfault, abort or hang
is caught and reported (with the call that was running) as a failure. Run
with -s to see the number of calls, the outcomes and the distinct error
messages. `python tests/test_hostile.py --seed S --calls N` runs it directly.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import traceback
from collections import Counter

ALLOWED = ("ValueError", "TypeError", "RuntimeError", "IndexError")
SEED, CALLS, TIMEOUT_S = 20240606, 2000, 150


# ---------------------------------------------------------------------------
# The fuzzer (runs in the child process).

def _fuzz(seed: int, calls: int, progress_path: str) -> dict:
    import torch

    import selfattn
    from selfattn import ops, reference
    from selfattn.testing import ATOL_FLOOR, max_err

    torch.set_num_threads(1)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

    def randn(shape, dtype=torch.float32, device="cpu"):
        t = torch.randn(shape, generator=gen).to(dtype)
        return t.to(device) if device != "cpu" else t

    # -- valid problems --------------------------------------------------
    def problem():
        B = rng.choice([1, 1, 2, 3])
        Hkv = rng.choice([1, 2])
        return dict(B=B, Sq=rng.choice([0, 1, 2, 5, 9, 70]), Sk=rng.choice([0, 1, 3, 8, 130]),
                    Hq=Hkv * rng.choice([1, 2, 3]), Hkv=Hkv, D=rng.choice([1, 4, 8, 13, 16]),
                    Dv=rng.choice([1, 4, 8, 16]), dtype=rng.choice(dtypes))

    def valid_qkv(p):
        return (randn((p["B"], p["Sq"], p["Hq"], p["D"]), p["dtype"]),
                randn((p["B"], p["Sk"], p["Hkv"], p["D"]), p["dtype"]),
                randn((p["B"], p["Sk"], p["Hkv"], p["Dv"]), p["dtype"]))

    def valid_mask(p):
        target = (p["B"], p["Hq"], p["Sq"], p["Sk"])
        r = rng.randint(0, 4)
        shape = tuple(t if rng.random() < 0.5 else 1 for t in target)[4 - r:]
        if rng.random() < 0.5:
            return torch.rand(shape, generator=gen) < 0.7
        return randn(shape, rng.choice([p["dtype"], torch.float32]))

    def valid_kl(p):
        return torch.tensor([rng.randint(0, p["Sk"]) for _ in range(p["B"])],
                            dtype=rng.choice([torch.int32, torch.int64]))

    # -- hostile values --------------------------------------------------
    def hostile_tensor(t, p):
        """A hostile replacement of tensor t (may be any object)."""
        choice = rng.randrange(16)
        if choice == 0:
            return rng.choice([None, 0, 1.5, "q", [], [[1.0]], (1, 2), object(), True])
        if choice == 1:
            return t.to(rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8,
                                    torch.complex64, torch.int8]))
        if choice == 2:  # rank
            return t.reshape(-1) if rng.random() < 0.5 else t.unsqueeze(0)
        if choice == 3:
            return t.to("meta")
        if choice == 4:  # one dim off by one (or to zero)
            shape = list(t.shape)
            if not shape:
                return t
            d = rng.randrange(len(shape))
            shape[d] = rng.choice([0, shape[d] + 1, max(0, shape[d] - 1), 600])
            return randn(tuple(shape), t.dtype)
        if choice == 5 and t.dim() >= 1:  # strided last dim
            return torch.cat([t, t], dim=-1)[..., ::2]
        if choice == 6 and t.dim() >= 1:  # expanded (stride 0) leading dim
            return t[:1].expand(t.shape) if t.shape[0] > 0 else t
        if choice == 7:  # other float dtype
            return t.to(rng.choice(dtypes))
        if choice == 8:
            return torch.tensor(1.0)
        if choice == 9:  # head dim out of range
            shape = list(t.shape)
            if shape:
                shape[-1] = rng.choice([0, 513, 1024])
            return randn(tuple(shape), t.dtype)
        if choice == 10 and t.dim() >= 2:  # transposed
            return t.transpose(0, 1)
        if choice == 11:
            return t.requires_grad_(True) if t.is_floating_point() else t
        if choice == 12:
            return randn((2, 3, 4, 5, 6), t.dtype)
        if choice == 13:
            return t.to(torch.float8_e4m3fn) if t.is_floating_point() else t
        if choice == 14 and t.numel() > 0:
            return t.float().fill_(float(rng.choice(["nan", "inf", "-inf"]))).to(t.dtype) \
                if t.is_floating_point() else t
        return t.detach().clone()

    def hostile_mask(p):
        return rng.choice([
            lambda: randn((2, 1, 1, 1, p["Sk"])),
            lambda: randn((p["Sq"] + 1, p["Sk"])),
            lambda: torch.ones(p["Sq"], p["Sk"], dtype=torch.int64),
            lambda: torch.ones(p["Sq"], p["Sk"], dtype=torch.complex64),
            lambda: torch.ones(p["Sq"], p["Sk"], dtype=torch.bool, device="meta"),
            lambda: randn((p["B"] + 1, p["Hq"], p["Sq"], p["Sk"])),
            lambda: randn((p["Sk"], p["Sq"])),
            lambda: randn(()),
            lambda: [[True]],
            lambda: "mask",
            lambda: randn((p["Sq"], p["Sk"]), torch.float64).requires_grad_(),
            lambda: torch.full((p["Sq"], p["Sk"]), float(rng.choice(["inf", "-inf", "nan"]))),
        ])()

    def hostile_kl(p):
        B = p["B"]
        return rng.choice([
            lambda: torch.full((B,), -1),
            lambda: torch.full((B,), 10**12),
            lambda: torch.full((B,), 2**62),
            lambda: torch.full((B,), -2**63),
            lambda: torch.full((B,), p["Sk"] + 1, dtype=torch.int32),
            lambda: torch.zeros(B, dtype=torch.float32),
            lambda: torch.zeros(B, dtype=torch.int16),
            lambda: torch.zeros(B, dtype=torch.bool),
            lambda: torch.zeros(B + 1, dtype=torch.int64),
            lambda: torch.zeros(B, 1, dtype=torch.int64),
            lambda: torch.tensor(3),
            lambda: torch.zeros(B, dtype=torch.int64, device="meta"),
            lambda: torch.arange(2 * B)[::2].clamp(max=p["Sk"]),
            lambda: [1] * B,
            lambda: 3,
        ])()

    def hostile_scalar(kind):
        pools = {
            "window": [(-7, 10**12), (1, 2, 3), "ab", 5, [3, 4], (1.5, 2), (True, 0), (2**62, 0),
                       (0, 10**12), (-1, -1), (-2, 0), (2**63, 0), (0, -2**64), (None, None),
                       (float("nan"), 1), ("1", 2), (), [None], (0, 0)],
            "scale": [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e308, 1e-308, "x",
                      True, 1j, None, 10**400, -0.0, 1e38],
            "dropout_p": [1.0, -0.1, float("nan"), 2, True, "0.1", 0.5, 0.999999, None, 1e-300,
                          float("inf")],
            "causal": [1, "yes", None, 0.0, [True]],
            "align": ["bottom-right", "TOP_LEFT", None, 0, b"top_left", ""],
            "generator": ["gen", 5, object()],
            "enable_gqa": [1, "no", None],
            "softcap": [-1.0, float("nan"), float("inf"), "c", True, None, 1e-30, 1e30, 10**400],
            "alibi": [torch.ones(5, 7), torch.ones(3, dtype=torch.float64), "slopes", [0.5],
                      torch.ones(3, device="meta"), torch.ones(1, requires_grad=True),
                      torch.ones(()), torch.full((3,), float("nan"))],
        }
        return rng.choice(pools[kind])

    def maybe(value, make_hostile, rate):
        """(value or a hostile replacement, whether it was replaced)."""
        if rng.random() < rate:
            return make_hostile(), True
        return value, False

    # -- one call ----------------------------------------------------------
    def fused_call(target, p, rate):
        q, k, v = valid_qkv(p)
        q, b1 = maybe(q, lambda: hostile_tensor(q, p), rate)
        k, b2 = maybe(k, lambda: hostile_tensor(k, p), rate)
        v, b3 = maybe(v, lambda: hostile_tensor(v, p), rate)
        bad = b1 or b2 or b3
        mask = valid_mask(p) if rng.random() < 0.4 else None
        mask, b = maybe(mask, lambda: hostile_mask(p), rate)
        bad |= b
        if target == "sdpa":
            kw = dict(attn_mask=mask, dropout_p=0.0, is_causal=rng.random() < 0.3 and mask is None,
                      scale=rng.choice([None, 0.3]), enable_gqa=p["Hq"] != p["Hkv"])
            for name, kind in (("dropout_p", "dropout_p"), ("is_causal", "causal"),
                               ("scale", "scale"), ("enable_gqa", "enable_gqa")):
                kw[name], b = maybe(kw[name], lambda kind=kind: hostile_scalar(kind), rate / 2)
                bad |= b
            tr = [x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                  for x in (q, k, v)]
            return "sdpa", (tr, kw), bad
        kw = dict(causal=rng.random() < 0.3, causal_alignment=rng.choice(["bottom_right",
                                                                          "top_left"]),
                  window=rng.choice([None, None, (2, 1), (0, None), (None, 0)]),
                  scale=rng.choice([None, 0.5]), attn_mask=mask,
                  key_lengths=valid_kl(p) if rng.random() < 0.3 else None, dropout_p=0.0,
                  alibi_slopes=rng.choice([None, None, None, torch.rand(p["Hq"], generator=gen),
                                           torch.rand(p["B"], p["Hq"], generator=gen)]),
                  softcap=rng.choice([0.0, 0.0, 0.0, 1.0, 30.0]))
        for name, kind in (("causal", "causal"), ("causal_alignment", "align"),
                           ("window", "window"), ("scale", "scale"), ("dropout_p", "dropout_p"),
                           ("alibi_slopes", "alibi"), ("softcap", "softcap")):
            kw[name], b = maybe(kw[name], lambda kind=kind: hostile_scalar(kind), rate / 2)
            bad |= b
        kw["key_lengths"], b = maybe(kw["key_lengths"], lambda: hostile_kl(p), rate / 2)
        bad |= b
        if rng.random() < rate / 3:
            kw["generator"] = hostile_scalar("generator")
            bad = True
        if target == "weights":
            if rng.random() < 0.3:
                kw["lse"] = rng.choice([torch.zeros(p["B"], p["Hq"], p["Sq"]),
                                        torch.zeros(p["B"], p["Sq"], p["Hq"]),
                                        torch.zeros(p["B"], p["Hq"], p["Sq"], dtype=torch.float64),
                                        "lse", torch.zeros(3, device="meta")])
                bad = True
            return "weights", ((q, k), kw), bad
        return "attention", ((q, k, v), kw), bad

    def op_call(target, p, rate):
        q, k, v = valid_qkv(p)
        mask = valid_mask(p) if rng.random() < 0.4 else None
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(p["dtype"])
        kl = valid_kl(p).to(torch.int64) if rng.random() < 0.3 else None
        dropout = rng.choice([0.0, 0.0, 0.3])
        rng_state = torch.tensor([rng.randrange(2**62), rng.randrange(2**62)]) if dropout else None
        vals = dict(q=q, k=k, v=v, attn_mask=mask, key_lengths=kl, rng_state=rng_state,
                    scale=0.5, window_left=rng.choice([-1, 0, 3]),
                    window_right=rng.choice([-1, 0, 2]),
                    diag_offset=rng.choice([0, p["Sk"] - p["Sq"], 5, -3]),
                    dropout_p=dropout, alibi_slopes=None, softcap=0.0, q_start=0, k_start=0)
        bad = False
        hostile = {
            "attn_mask": lambda: hostile_mask(p), "key_lengths": lambda: hostile_kl(p),
            "rng_state": lambda: rng.choice([torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0]),
                                             torch.zeros(2, dtype=torch.int64, device="meta"),
                                             torch.zeros(4, dtype=torch.int64)[::2], None]),
            "scale": lambda: rng.choice([float("nan"), float("inf"), "x", None, 10**400, -1.0]),
            "window_left": lambda: rng.choice([-5, 2**63, 1.5, None, "1", 10**12, -2**63]),
            "window_right": lambda: rng.choice([-2, 2**64, 2.0, None, 10**12]),
            "diag_offset": lambda: rng.choice([2**62, -2**62, 2**62 + 1, -2**63, 2**63, "yes",
                                               None, 1.0]),
            "alibi_slopes": lambda: rng.choice([torch.ones(p["Hq"], dtype=torch.float64),
                                                torch.ones(p["Hq"] + 1), torch.ones(3, 3),
                                                torch.ones(2 * p["Hq"])[::2], torch.ones(()),
                                                torch.ones(p["Hq"], device="meta"), "s"]),
            "softcap": lambda: rng.choice([-1.0, float("inf"), float("nan"), "c", None, 1e-30]),
            "q_start": lambda: rng.choice([-1, 2**63, 2**63 - 1, 1.5, None]),
            "k_start": lambda: rng.choice([-7, 2**64, 2**63 - 1, "0"]),
            "dropout_p": lambda: rng.choice([1.0, -0.5, float("nan"), "p", 0.7, None]),
        }
        for name in list(vals):
            if name in ("q", "k", "v"):
                vals[name], b = maybe(vals[name], lambda n=name: hostile_tensor(vals[n], p), rate)
            else:
                vals[name], b = maybe(vals[name], hostile[name], rate / 2)
            bad |= b
        order = ["q", "k", "v", "attn_mask", "key_lengths", "rng_state", "scale", "window_left",
                 "window_right", "diag_offset", "dropout_p", "alibi_slopes", "softcap",
                 "q_start", "k_start"]
        if target == "op_forward":
            return "op_forward", [vals[n] for n in order], bad
        if target == "op_probs":
            lse = None
            if rng.random() < 0.3:
                lse = rng.choice([torch.zeros(p["B"], p["Hq"], p["Sq"]),
                                  torch.full((p["B"], p["Hq"], p["Sq"]), float("inf")),
                                  torch.zeros(p["B"], p["Sq"], p["Hq"]), "lse"])
                bad = True
            return "op_probs", [vals["q"], vals["k"], lse] + [vals[n] for n in order[3:]], bad
        # backward: outputs of a valid forward, then hostile replacements
        q0, k0, v0 = valid_qkv(p)
        out, lse = ops.forward_op(q0, k0, v0, None, None, None, 0.5, -1, -1, 0, 0.0, None, 0.0,
                                  0, 0)
        dout = torch.randn_like(out)
        bwd = dict(dout=dout, q=q0, k=k0, v=v0, out=out, lse=lse)
        for name in list(bwd):
            bwd[name], b = maybe(bwd[name], lambda n=name: hostile_tensor(bwd[n], p), rate)
            bad |= b
        mask_grad = rng.random() < 0.3
        mg, b = maybe(mask_grad, lambda: rng.choice([1, "yes", None]), rate / 2)
        bad |= b
        args = [bwd[n] for n in ("dout", "q", "k", "v", "out", "lse")] + \
            [vals[n] for n in order[3:]] + [mg]
        return "op_backward", args, bad

    # -- judging a result --------------------------------------------------
    def to64(x):
        return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def judge(kind, payload, result):
        """None if fine, else a description of a wrong result."""
        if kind in ("attention", "weights", "sdpa"):
            (tensors, kw) = payload
            ref_fn = {"attention": reference.attention, "weights": reference.attention_weights,
                      "sdpa": reference.scaled_dot_product_attention}[kind]
            out = result[0] if isinstance(result, tuple) else result
            if not isinstance(out, torch.Tensor):
                return f"returned {type(out).__name__}"
            if out.device.type == "meta":
                return None
            dropout = kw.get("dropout_p", 0.0)
            kw_ref = {n: x for n, x in kw.items() if n not in ("generator", "lse", "return_lse")}
            try:
                ref = ref_fn(*tensors, **kw_ref)
                ref64 = ref_fn(*[to64(t) for t in tensors],  # the slopes are float32 always
                               **{n: x if n == "alibi_slopes" else to64(x)
                                  for n, x in kw_ref.items()})
            except Exception as e:  # fused accepted what the reference refuses
                return f"reference refused ({type(e).__name__}: {e}) what fused accepted"
            if out.shape != ref.shape or out.dtype != ref.dtype:
                return f"shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}"
            if isinstance(dropout, float) and dropout > 0:
                return None  # random; shapes checked
            if kw.get("lse") is not None:
                return None  # weights from a caller's lse (trusted, not recomputed)
            nonfinite_input = any(
                isinstance(t, torch.Tensor) and t.is_floating_point()
                and not torch.isfinite(t.detach()).all()
                for t in list(tensors) + [kw.get("attn_mask"), kw.get("alibi_slopes")])
            huge_scale = isinstance(kw.get("scale"), float) and abs(kw["scale"]) > 1e30
            if nonfinite_input or huge_scale:
                # inf/NaN inputs or overflowing scores: NaN patterns are a known
                # divergence (tests/test_edge_cases.py); only "no crash" is checked
                return None
            if not torch.equal(torch.isnan(ref64), torch.isnan(out)):
                return "NaN pattern differs from the reference"
            fin = torch.isfinite(ref64)
            if fin.any():
                a, r, g = out[fin], ref[fin], ref64[fin]
                bound = max(ATOL_FLOOR[out.dtype] * max(1.0, g.abs().max().item()),
                            4 * max_err(r, g))
                if max_err(a, g) > bound:
                    return f"error {max_err(a, g):.3e} > {bound:.3e}"
            return None
        if kind == "op_forward":
            out, lse = result
            q, k, v = payload[:3]
            if out.device.type == "meta":
                return None
            if tuple(out.shape) != (q.shape[0], q.shape[1], q.shape[2], v.shape[3]):
                return f"op out shape {tuple(out.shape)}"
            return None
        if kind == "op_backward":
            dq, dk, dv, _ = result
            q, k, v = payload[1:4]
            if dq.device.type != "meta" and (dq.shape != q.shape or dk.shape != k.shape
                                             or dv.shape != v.shape):
                return "op backward shapes"
            return None
        if kind == "op_probs":
            return None
        return None

    # -- the loop ------------------------------------------------------------
    outcomes, messages, failures = Counter(), Counter(), []
    targets = ["attention"] * 4 + ["sdpa"] * 2 + ["weights"] * 2 + \
        ["op_forward", "op_backward", "op_probs"] * 1
    with open(progress_path, "w") as progress:
        for i in range(calls):
            target = rng.choice(targets)
            p = problem()
            rate = rng.choice([0.05, 0.15, 0.3])
            if target.startswith("op_"):
                kind, payload, bad = op_call(target, p, rate)
            else:
                kind, payload, bad = fused_call(target, p, rate)

            def describe():
                def d(x):
                    if isinstance(x, torch.Tensor):
                        return f"T{tuple(x.shape)}:{x.dtype}:{x.device.type}:{x.stride()}"
                    if isinstance(x, (list, tuple)):
                        return type(x)(d(y) for y in x) if not isinstance(x, tuple) or \
                            len(x) < 8 else str(x)
                    if isinstance(x, dict):
                        return {n: d(y) for n, y in x.items()}
                    return repr(x)[:60]
                return f"call {i} {kind} {d(payload)}"

            progress.write(describe() + "\n")
            progress.flush()
            try:
                if kind == "attention":
                    (q, k, v), kw = payload
                    if rng.random() < 0.2:
                        kw["return_lse"] = True
                    result = selfattn.attention(q, k, v, **kw)
                elif kind == "weights":
                    (q, k), kw = payload
                    result = selfattn.attention_weights(q, k, **kw)
                elif kind == "sdpa":
                    (q, k, v), kw = payload
                    result = selfattn.scaled_dot_product_attention(q, k, v, **kw)
                elif kind == "op_forward":
                    result = ops.forward_op(*payload)
                elif kind == "op_backward":
                    result = ops.backward_op(*payload)
                else:
                    result = ops.probs_op(*payload)
                # a differentiable result also runs backward
                out = result[0] if isinstance(result, tuple) else result
                if isinstance(out, torch.Tensor) and out.requires_grad and out.device.type != "meta":
                    out.sum().backward()
            except Exception as e:  # noqa: BLE001 (the point: classify every exception)
                name = type(e).__name__
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                if not isinstance(e, (ValueError, TypeError, RuntimeError, IndexError)):
                    failures.append(f"{describe()}: unexpected {name}: {msg}\n"
                                    + "".join(traceback.format_tb(e.__traceback__)[-3:]))
                    outcomes["bad_exception"] += 1
                    continue
                if not msg:
                    failures.append(f"{describe()}: {name} with an empty message")
                    outcomes["empty_message"] += 1
                    continue
                outcomes[f"raised {name}"] += 1
                if name == "IndexError":  # rarely informative: keep where it came from
                    tb = traceback.extract_tb(e.__traceback__)[-1]
                    msg += f" [at {os.path.basename(tb.filename)}:{tb.lineno} {tb.line}]"
                # distinct messages: numbers and shapes normalised away
                key = re.sub(r"\d+", "N", f"{name}: {msg}")[:160]
                messages[key] += 1
                continue
            problem_desc = judge(kind, payload, result)
            if problem_desc is not None and problem_desc.startswith("KNOWN: "):
                outcomes["known bug: " + problem_desc[7:]] += 1
            elif problem_desc is None:
                outcomes["returned" + ("" if not bad else " (hostile args accepted)")] += 1
            else:
                outcomes["wrong_result"] += 1
                failures.append(f"{describe()}: {problem_desc}")
                if os.environ.get("SELFATTN_FUZZ_DUMP"):  # for debugging: the failing call
                    torch.save((kind, payload, result), os.path.join(os.environ["SELFATTN_FUZZ_DUMP"],
                                                             f"call{i}.pt"))
    return dict(calls=calls, outcomes=dict(outcomes), messages=dict(messages), failures=failures)


# ---------------------------------------------------------------------------
# The test (parent process).

def _run_child(seed, calls, tmp_path):
    progress = os.path.join(str(tmp_path), "progress.txt")
    out = os.path.join(str(tmp_path), "result.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, os.path.abspath(__file__), "--seed", str(seed), "--calls", str(calls),
           "--progress", progress, "--out", out]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        last = open(progress).read().splitlines()[-1:] if os.path.exists(progress) else []
        raise AssertionError(f"fuzzer hung (> {TIMEOUT_S} s); last call: {last}") from None
    if proc.returncode != 0:
        last = open(progress).read().splitlines()[-1:] if os.path.exists(progress) else []
        raise AssertionError(
            f"fuzzer process died with return code {proc.returncode} (negative = signal) "
            f"during: {last}\nstderr tail:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def test_hostile_inputs_never_crash(tmp_path):
    res = _run_child(SEED, CALLS, tmp_path)
    print(f"\nhostile fuzzer: seed {SEED}, {res['calls']} calls")
    for k, n in sorted(res["outcomes"].items()):
        print(f"  {k}: {n}")
    print(f"  distinct error messages: {len(res['messages'])}")
    for m, n in sorted(res["messages"].items(), key=lambda x: -x[1]):
        print(f"    {n:5d}  {m}")
    assert res["calls"] == CALLS
    assert not res["failures"], f"{len(res['failures'])} failures:\n" + \
        "\n".join(res["failures"][:20])


def _main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--progress", default=os.devnull)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = _fuzz(a.seed, a.calls, a.progress)
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    _main()
