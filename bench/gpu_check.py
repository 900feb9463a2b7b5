"""On a CUDA GPU: our GPU paths against references, and training-step throughput.

    python bench/gpu_check.py [--sizes=160m,410m,1b] [--json=FILE]

1. Attention: `attend(impl="cudnn")` and `impl="xla"` in bf16 against an fp32 XLA reference,
   causal, at each Pythia head_dim's shape (batch 2 x heads x 2048): the forward output and the
   q/k/v gradients, error as max |diff| / max |reference|.
2. Model: pythia-160m-shaped random weights. fp32 logits (JAX matmul precision "highest") against
   `transformers.GPTNeoXForCausalLM` on the same GPU (TF32 off) loaded from our export; bf16
   compute with attention_impl="cudnn" against "xla": max |logit diff| and top-1 agreement.
3. Generation: greedy, a batch of four prompts of different lengths, 32 new tokens, fp32: ours
   against transformers' `generate(do_sample=False)` token for token.
4. Inference speed, pythia-160m and pythia-410m shapes, bf16 weights and compute on both sides:
   `pythia_jax.forward` (cuDNN attention) against HF's `model(ids).logits` (SDPA), 8 x 512
   tokens; greedy `pythia_jax.generate` against HF `generate(do_sample=False)`, 32-token
   prompts, 128 new tokens, batch 1 and 8 (median wall time of a few calls after a warm-up).
5. Training step, through `bench/gpu_train.py` (which also compares variants and profiles the
   step): `train.make_train_step` on `configs/pythia.py:<size>` (bf16 compute, fp32 master
   weights and AdamW state, scanned layers, the config's remat, cuDNN attention through `auto`)
   at batch x 2048 tokens: seconds per step, tokens/s, MFU with attention counted causally and
   in full (PaLM) against the nominal dense bf16 peak, and the fraction of a plain bf16 8192^3
   matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


sys.path.insert(0, str(REPO / "bench"))
from attention import _time  # noqa: E402  (median of timed calls after two warm-ups)

from gpu_train import PEAK_BF16  # noqa: E402  (nominal dense bf16 TFLOP/s by device kind)


def matmul_tflops(n=8192):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n ** 3 / _time(f, (a, b), 20) / 1e12


def check_attention():
    from pythia_jax.attention import attend
    from pythia_jax.attention.tpu_compile import PYTHIA_SHAPES
    rows = []
    for H, (model, N) in sorted(PYTHIA_SHAPES.items()):
        B, T = 2, 2048
        ks = jax.random.split(jax.random.PRNGKey(H), 4)
        q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32) for kk in ks)

        def loss(q, k, v, impl, dt):
            o = attend(q.astype(dt), k.astype(dt), v.astype(dt), impl=impl, causal=True)
            return jnp.sum(o.astype(jnp.float32) * do), o

        def run(impl, dt):
            (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                static_argnums=(3, 4))(q, k, v, impl, dt)
            return [np.asarray(x, np.float32) for x in (o, *g)]

        with jax.default_matmul_precision("highest"):
            ref = run("xla", jnp.float32)
        row = {"head_dim": H, "model": model, "shape": [B, T, N, H]}
        for impl in ("cudnn", "xla"):
            got = run(impl, jnp.bfloat16)
            for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
                row[f"{impl}_{name}_rel_err"] = float(np.abs(g - r).max() / np.abs(r).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check_model_and_generation(preset="pythia-160m", device="cuda"):
    import dataclasses

    import torch
    from flax import nnx
    from transformers import GPTNeoXForCausalLM

    import pythia_jax
    from pythia_jax.config import get_preset
    from pythia_jax.model import GPTNeoX
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_preset(preset)
    ours = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    _log("model built")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pythia_jax.save_pretrained(ours, tmp, tokenizer=False)
        hf = GPTNeoXForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
    ids = np.random.default_rng(0).integers(0, 50000, (2, 512), dtype=np.int32)
    with torch.inference_mode():
        ref = hf(torch.from_numpy(ids.astype(np.int64)).to(device)).logits.float().cpu().numpy()
    _log("hf forward done")
    with jax.default_matmul_precision("highest"):
        got = np.asarray(pythia_jax.forward(ours, ids))
    _log("our fp32 forward done")
    out["fp32_max_abs_logit_diff_vs_hf"] = float(np.abs(got - ref).max())
    out["fp32_logit_scale"] = float(np.abs(ref).max())

    graphdef, params = nnx.split(ours)
    logits = {}
    for impl in (("cudnn", "xla") if device == "cuda" else ("xla",)):
        c = dataclasses.replace(cfg, dtype="bfloat16", attention_impl=impl)
        m = nnx.merge(nnx.graphdef(GPTNeoX(c, rngs=nnx.Rngs(0))), params)
        logits[impl] = np.asarray(pythia_jax.forward(m, ids))
    _log("bf16 forwards done")
    if "cudnn" in logits:
        out["bf16_cudnn_vs_xla_max_abs_logit_diff"] = float(
            np.abs(logits["cudnn"] - logits["xla"]).max())
        out["bf16_cudnn_vs_xla_top1_agreement"] = float(
            (logits["cudnn"].argmax(-1) == logits["xla"].argmax(-1)).mean())
    for impl, lg in logits.items():
        out[f"bf16_{impl}_top1_agreement_vs_fp32_hf"] = float((lg.argmax(-1) == ref.argmax(-1)).mean())

    prompts = [list(range(100, 100 + n)) for n in (5, 17, 9, 30)]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50000, len(p)).tolist() for p in prompts]
    with jax.default_matmul_precision("highest"):
        mine = pythia_jax.generate(ours, prompts, 32)
    _log("our generation done")
    theirs = []
    for p in prompts:
        with torch.inference_mode():
            g = hf.generate(torch.tensor([p]).to(device), max_new_tokens=32, do_sample=False,
                            min_new_tokens=32, pad_token_id=0)
        theirs.append(g[0, len(p):].tolist())
    out["greedy_sequences_equal"] = [a == b for a, b in zip(mine, theirs)]
    out["greedy_token_agreement"] = float(np.mean(
        [x == y for a, b in zip(mine, theirs) for x, y in zip(a, b)]))
    print(json.dumps(out), flush=True)
    return out


def inference_speed(preset: str, reps: int = 5, device="cuda"):
    """bf16 on both sides: forward logits and greedy generation, ours vs transformers."""
    import torch
    from flax import nnx
    from transformers import GPTNeoXForCausalLM

    import pythia_jax
    from pythia_jax.config import get_preset
    from pythia_jax.model import GPTNeoX
    cfg = get_preset(preset, param_dtype="bfloat16", dtype="bfloat16",
                     attention_impl="cudnn" if device == "cuda" else "xla")
    ours = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        pythia_jax.save_pretrained(ours, tmp, tokenizer=False)
        hf = GPTNeoXForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row = {"preset": preset}
    ids = np.random.default_rng(0).integers(0, 50000, (8, 512), dtype=np.int32)
    tids = torch.from_numpy(ids.astype(np.int64)).to(device)

    def hf_fwd():
        with torch.inference_mode():
            hf(tids).logits
        sync()
    row["forward_8x512_ours_ms"] = 1e3 * _time(
        lambda: pythia_jax.forward(ours, ids), (), reps)
    row["forward_8x512_hf_ms"] = 1e3 * _time(hf_fwd, (), reps)
    rng = np.random.default_rng(1)
    for b in (1, 8):
        prompts = rng.integers(0, 50000, (b, 32)).tolist()
        tp = torch.tensor(prompts, device=device)

        def ours_gen():
            return pythia_jax.generate(ours, prompts, 128)

        def hf_gen():
            with torch.inference_mode():
                g = hf.generate(tp, attention_mask=torch.ones_like(tp), max_new_tokens=128,
                                min_new_tokens=128, do_sample=False, pad_token_id=0)
            sync()
            return g
        row[f"generate_b{b}_ours_s"] = _time(ours_gen, (), max(2, reps // 2))
        row[f"generate_b{b}_hf_s"] = _time(hf_gen, (), max(2, reps // 2))
        mine, theirs = ours_gen(), hf_gen()[:, 32:].tolist()
        row[f"generate_b{b}_token_agreement"] = float(np.mean(
            [x == y for a, t in zip(mine, theirs) for x, y in zip(a, t)]))
    for k in ("forward_8x512", "generate_b1", "generate_b8"):
        u = "ms" if k.startswith("forward") else "s"
        row[f"{k}_speedup"] = row[f"{k}_hf_{u}"] / row[f"{k}_ours_{u}"]
    print(json.dumps(row), flush=True)
    return row


def train_throughput(size: str, batch: int, steps: int, peak_mm: float, peak_nominal):
    """`bench/gpu_train.py`'s measurement of one size (the config's defaults), plus the
    fraction of the bf16 matmul rate measured in this run."""
    from gpu_train import run_variant
    row = run_variant(size, batch, None, [], steps, peak_nominal)
    row["frac_of_matmul"] = row["tflops_palm"] / peak_mm
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="160m,410m,1b")
    ap.add_argument("--batch", default="16,16,8", help="sequences per step, one per size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: attention,model,inference,train")
    ap.add_argument("--inference_sizes", default="pythia-160m,pythia-410m")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(int(os.environ.get("GPU_CHECK_STACK_AFTER", "240")), repeat=True)  # where a stuck part is stuck
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise SystemExit(f"bench/gpu_check.py needs a CUDA GPU; JAX sees {dev.platform!r}")
    import torch
    kind = dev.device_kind
    res = {"device": kind, "jax": jax.__version__, "torch": torch.__version__}
    res["bf16_matmul_tflops"] = matmul_tflops()
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    print(json.dumps(res), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    if "attention" not in skip:
        res["attention"] = check_attention()
    if "model" not in skip:
        res["model"] = check_model_and_generation()
    if "inference" not in skip:
        res["inference"] = [inference_speed(p) for p in args.inference_sizes.split(",")]
    if "train" not in skip:
        res["train"] = []
        batches = [int(x) for x in args.batch.split(",")]
        for size, b in zip(args.sizes.split(","), batches):
            try:
                res["train"].append(train_throughput(size, b, args.steps,
                                                     res["bf16_matmul_tflops"], peak))
            except Exception as e:  # noqa: BLE001 - report and go on to the next size
                res["train"].append({"size": size, "error": f"{type(e).__name__}: {e}"[:500]})
                print(json.dumps(res["train"][-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
