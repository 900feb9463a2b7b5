"""run_with_cache of the residual sites, pythia-160m shape, fp32 CPU: pythia_jax.interp vs
TransformerLens (4.x, `TransformerBridge` over the same transformers model), same weights.

    JAX_PLATFORMS=cpu python bench/interp.py [--preset=160m] [--shapes=1x128,4x256] \
        [--repeats=5] [--sites=resid|all]

Ours: `interp.run_with_cache(model, ids, names)` with every layer's `hook_resid_pre` and
`hook_resid_post` (`--sites=all`: every site), waited on until every array is ready (the
captures stay on the device). TransformerLens: `bridge.run_with_cache(ids, names_filter=...)`
under `torch.inference_mode()` with the same names (the bridge runs transformers' model with
eager attention, which TransformerLens forces so that it can hook the pattern). Random
weights: our model exported with `save_pretrained`, loaded by transformers, wrapped by
`TransformerBridge.boot_transformers(dir, hf_model=...)`. Trials alternate ours / theirs so
load from other processes hits both alike; we report the median and the best, and check that
both return the same values. Ratio = TransformerLens time / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from forward import build_pair, machine_info  # noqa: E402  (same random-weight pair)


def _names(cfg, sites: str) -> list[str]:
    from pythia_jax import interp
    if sites == "all":
        return interp.site_names(cfg)
    return [f"blocks.{l}.{s}" for l in range(cfg.num_layers)
            for s in ("hook_resid_pre", "hook_resid_post")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="160m")
    ap.add_argument("--shapes", default="1x128,4x256", help="BxT,BxT,...")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sites", choices=("resid", "all"), default="resid")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    import jax
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from pythia_jax import interp
    from transformers import PreTrainedTokenizerFast

    from pythia_jax.tokenizer import bundled_tokenizer_path

    results = {"machine": machine_info(), "preset": args.preset, "sites": args.sites,
               "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, d = build_pair(args.preset, tmp)
        cfg = ours.config
        bridge = TransformerBridge.boot_transformers(d, hf_model=hf, device="cpu",
                                                     tokenizer=PreTrainedTokenizerFast(
                                                         tokenizer_file=bundled_tokenizer_path(),
                                                         eos_token="<|endoftext|>"))
        names = _names(cfg, args.sites)
        wanted = set(names)
        for B, T in shapes:
            ids = np.random.default_rng(0).integers(0, 50000, size=(B, T))
            tids = torch.as_tensor(ids)

            def run_ours():
                logits, cache = interp.run_with_cache(ours, ids, names)
                jax.block_until_ready((logits, cache))
                return logits, cache

            def run_tl():
                with torch.inference_mode():
                    return bridge.run_with_cache(tids, names_filter=lambda n: n in wanted)

            ol, oc = run_ours()
            tl, tc = run_tl()
            missing = sorted(wanted - set(tc.keys()))
            if missing:
                raise SystemExit(f"TransformerLens returned no {missing[:3]}...")
            err = max(float(np.abs(np.asarray(oc[n]) - tc[n].numpy()).max()) for n in names)
            lerr = float(np.abs(np.asarray(ol)[..., :tl.shape[-1]] - tl.numpy()).max())
            t_ours, t_tl = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                run_ours()
                t_ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                run_tl()
                t_tl.append(time.perf_counter() - t)
            row = {"batch": B, "length": T, "names": len(names),
                   "ours_median_s": statistics.median(t_ours), "ours_best_s": min(t_ours),
                   "tl_median_s": statistics.median(t_tl), "tl_best_s": min(t_tl),
                   "max_abs_diff_captures": err, "max_abs_diff_logits": lerr}
            row["ratio_median"] = row["tl_median_s"] / row["ours_median_s"]
            row["ratio_best"] = row["tl_best_s"] / row["ours_best_s"]
            results["rows"].append(row)
            print(f"{B}x{T}: {len(names)} captures: ours {row['ours_median_s'] * 1e3:.0f} ms "
                  f"(best {row['ours_best_s'] * 1e3:.0f}), TransformerLens "
                  f"{row['tl_median_s'] * 1e3:.0f} ms (best {row['tl_best_s'] * 1e3:.0f}): "
                  f"{row['ratio_median']:.2f}x median, {row['ratio_best']:.2f}x best; "
                  f"max |diff| captures {err:.1e}, logits {lerr:.1e}", flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
