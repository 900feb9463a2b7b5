"""One training step: our JAX path against the same model and optimizer in PyTorch, on CPU.

    JAX_PLATFORMS=cpu .venv/bin/python bench/train_step.py --sizes=70m,160m --batch=8 --seq=256

JAX: `pythia_jax.train.make_train_step` on `configs/pythia.py:<size>` (jit, donated state, fp32
master weights, scan over layers as in the config, fp32 compute here, loss over the padded vocab,
clip 1.0 + AdamW with the weight-decay mask + NeoX schedule; `--unrolled` for the layer loop).
PyTorch: `transformers.GPTNeoXForCausalLM` built from the same config (fp32), forward with
labels, backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` with a decay / no-decay parameter
group, `zero_grad`. Same shapes: batch x seq tokens per step on both sides.

Reported per size: median seconds per step, tokens/s, the JAX / torch speed ratio, and the
achieved GFLOP/s of each side (training FLOPs per token = 3 x forward, forward = 2 x matmul
weights incl. embed_out + attention 4 L T d; `ModelConfig.flops_per_token`) against a plain fp32
matmul (2048^3, best of JAX and torch) measured in the same run. Rounds interleave the two
sides so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pythia_jax.configs import pythia as pythia_configs  # noqa: E402


def _pythia_config(size: str, batch: int, seq: int, scan: bool):
    c = pythia_configs.get_config(size)
    c.model.dtype = "float32"           # fp32 on both sides (CPU)
    c.model.gelu_approximate = False    # HF "gelu" (exact erf) on both sides
    c.model.scan_layers = scan
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    c.train.batch_size = batch
    c.train.seq_len = seq
    c.optim.warmup_steps = 0            # a non-zero LR from the first step on both sides
    return c


def _timeit(fn, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call. CPU time counts every thread of this process, so
    GFLOP per CPU-second is insensitive to other processes competing for the cores."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n


class JaxSide:
    def __init__(self, config, tokens: np.ndarray):
        from pythia_jax import train
        self.mesh = train.make_mesh(config)
        self.state, self.setup = train.create_train_state(config, self.mesh)
        self.step = train.make_train_step(self.setup)
        self.batch = {"inputs": jax.device_put(tokens[:, :-1], self.setup.batch_sharding),
                      "targets": jax.device_put(tokens[:, 1:], self.setup.batch_sharding)}
        t = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - t

    def run(self, n: int):
        m = None
        for _ in range(n):
            self.state, m = self.step(self.state, self.batch)
        jax.block_until_ready((self.state.params, m))
        self.loss = float(m["loss"])


class TorchSide:
    def __init__(self, model_cfg, optim_cfg, tokens: np.ndarray):
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        from pythia_jax import optim

        self.torch = torch
        hf = model_cfg.to_hf_dict(torch_dtype="float32")
        hf.pop("torch_dtype", None)
        cfg = GPTNeoXConfig(**hf)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        self.model = GPTNeoXForCausalLM(cfg).float().train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "layernorm" in name or "layer_norm" in name
             else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(optim_cfg.weight_decay)},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(optim_cfg.peak_lr), betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
        self.schedule = lambda n: optim.pythia_lr(n, optim_cfg.peak_lr, optim_cfg.min_lr,
                                                  optim_cfg.warmup_steps, optim_cfg.decay_steps)
        # same token count per step as the JAX side: T inputs, T targets
        self.ids = torch.tensor(tokens.astype(np.int64))
        self.count = 0
        t = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - t

    def run(self, n: int):
        torch = self.torch
        for _ in range(n):
            out = self.model(input_ids=self.ids[:, :-1])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for g in self.opt.param_groups:
                g["lr"] = self.schedule(self.count)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.count += 1
        self.loss = float(loss.detach())


class Matmul:
    """A plain fp32 matmul, n x n x n, in JAX and in torch (the bound: the better of the two)."""

    def __init__(self, n: int = 2048):
        import torch
        self.torch = torch
        self.flops = 2 * n ** 3
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.f = jax.jit(lambda x, y: x @ y)
        self.f(self.a, self.a).block_until_ready()
        self.ta = torch.randn(n, n)
        torch.mm(self.ta, self.ta)

    def measure(self, reps: int = 3) -> dict:
        j = [_timeit(lambda: self.f(self.a, self.a).block_until_ready(), 1) for _ in range(reps)]
        t = [_timeit(lambda: self.torch.mm(self.ta, self.ta), 1) for _ in range(reps)]
        best_wall = min(min(x[0] for x in j), min(x[0] for x in t))
        best_cpu = min(min(x[1] for x in j), min(x[1] for x in t))
        return {"wall_gflops": self.flops / best_wall / 1e9,
                "cpu_gflops": self.flops / best_cpu / 1e9,
                "jax_wall_gflops": self.flops / min(x[0] for x in j) / 1e9,
                "torch_wall_gflops": self.flops / min(x[0] for x in t) / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="70m,160m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per side per round")
    ap.add_argument("--unrolled", action="store_true",
                    help="unrolled layer loop (default: scan_layers=True, as configs/pythia.py)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    results = {}
    mm = Matmul()
    for size in args.sizes.split(","):
        config = _pythia_config(size, args.batch, args.seq, scan=not args.unrolled)
        from pythia_jax import train
        mcfg = train.model_config_from(config)
        rng = np.random.RandomState(0)
        tokens = rng.randint(0, 50277, (args.batch, args.seq + 1)).astype(np.int32)
        js = JaxSide(config, tokens)
        ts = TorchSide(mcfg, config.optim, tokens)
        tokens_per_step = args.batch * args.seq
        gflop = mcfg.flops_per_token(args.seq)["training"] * tokens_per_step / 1e9
        rounds = []
        for _ in range(args.rounds):  # interleaved: matmul, jax, torch
            m = mm.measure()
            jw, jc = _timeit(lambda: js.run(1), args.steps)
            tw, tc = _timeit(lambda: ts.run(1), args.steps)
            rounds.append({"matmul": m, "jax": (jw, jc), "torch": (tw, tc)})
        med = statistics.median
        r = {
            "params": mcfg.param_counts()["total"], "gflop_per_step": gflop,
            "jax_s_per_step": med(x["jax"][0] for x in rounds),
            "torch_s_per_step": med(x["torch"][0] for x in rounds),
            "speedup_wall": med(x["torch"][0] / x["jax"][0] for x in rounds),
            "speedup_cpu": med(x["torch"][1] / x["jax"][1] for x in rounds),
            "matmul_wall_gflops": med(x["matmul"]["wall_gflops"] for x in rounds),
            "matmul_cpu_gflops": med(x["matmul"]["cpu_gflops"] for x in rounds),
            "jax_frac_wall": med(gflop / x["jax"][0] / x["matmul"]["wall_gflops"] for x in rounds),
            "torch_frac_wall": med(gflop / x["torch"][0] / x["matmul"]["wall_gflops"]
                                   for x in rounds),
            "jax_frac_cpu": med(gflop / x["jax"][1] / x["matmul"]["cpu_gflops"] for x in rounds),
            "torch_frac_cpu": med(gflop / x["torch"][1] / x["matmul"]["cpu_gflops"]
                                  for x in rounds),
            "jax_compile_s": js.compile_s, "losses": [js.loss, ts.loss], "rounds": rounds,
        }
        r["jax_tokens_per_s"] = tokens_per_step / r["jax_s_per_step"]
        r["torch_tokens_per_s"] = tokens_per_step / r["torch_s_per_step"]
        r["jax_gflops"] = gflop / r["jax_s_per_step"]
        r["torch_gflops"] = gflop / r["torch_s_per_step"]
        r["jax_gflops_per_cpu_s"] = gflop / med(x["jax"][1] for x in rounds)
        r["torch_gflops_per_cpu_s"] = gflop / med(x["torch"][1] for x in rounds)
        results[size] = r
        print(f"{size} ({r['params'] / 1e6:.0f}M params, {gflop:.0f} GFLOP/step): "
              f"jax {r['jax_s_per_step']:.2f} s/step = {r['jax_tokens_per_s']:.0f} tok/s, "
              f"torch {r['torch_s_per_step']:.2f} s/step = {r['torch_tokens_per_s']:.0f} tok/s; "
              f"jax/torch {r['speedup_wall']:.2f}x (wall), {r['speedup_cpu']:.2f}x (CPU time)",
              flush=True)
        print(f"  GFLOP/s: jax {r['jax_gflops']:.1f}, torch {r['torch_gflops']:.1f}, fp32 matmul "
              f"{r['matmul_wall_gflops']:.1f} -> jax {100 * r['jax_frac_wall']:.0f}%, torch "
              f"{100 * r['torch_frac_wall']:.0f}% of the matmul (per-round, wall); per CPU-second: "
              f"jax {r['jax_gflops_per_cpu_s']:.1f}, torch {r['torch_gflops_per_cpu_s']:.1f}, "
              f"matmul {r['matmul_cpu_gflops']:.1f} -> jax {100 * r['jax_frac_cpu']:.0f}%, torch "
              f"{100 * r['torch_frac_cpu']:.0f}%", flush=True)
        del js, ts
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
