"""Sharding: mesh construction, the logical-axis rules, and (in one subprocess with 8 fake CPU
devices) the train step on five meshes against one device, gradient accumulation, sharded
checkpoints restored on other meshes, and sharded HF loading.

The 8-device work runs in a subprocess (`python tests/test_sharding.py worker OUT`), because
XLA_FLAGS must be set before JAX starts and the main test process keeps its single CPU device.
It writes results.json; the tests below assert on it (one JAX start-up for all cases).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)]
# the per-step vs per-microbatch reduction check: pure data, data+fsdp, data+fsdp+tensor (the
# pure-fsdp and pure-tensor meshes add compiles, not cases: (1, 8, 1) is (2, 4, 1)'s fsdp path,
# and (1, 1, 8) has one batch shard, where "step" is the per-microbatch program)
REDUCE_MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
# (mesh, grad_accum_steps, train.grad_reduce): "auto" is "microbatch" with fsdp, else "step"
ACCUM_CASES = [((2, 2, 2), 2, "auto"), ((2, 2, 2), 2, "step"), ((8, 1, 1), 2, "auto")]
REDUCE_OPS = ("all-reduce", "reduce-scatter")
DIRECT_INIT = {(2, 2, 2)}   # meshes whose state is initialized directly sharded (the others
                            # receive the reference's initial values: one init compile less)
RTOL = 1e-5


def tiny_train_config(mesh_shape, grad_accum_steps: int = 0, num_heads: int = 8,
                      grad_reduce: str = "auto"):
    """configs/smoke.py shrunk: d=64, 2 layers, vocab 256, fp32, batch 16 x 16 tokens."""
    import ml_collections

    from pythia_jax.configs import smoke
    from pythia_jax.sharding import MESH_AXES

    c = smoke.get_config()
    c.model.hidden_size = 64
    c.model.num_layers = 2
    c.model.num_heads = num_heads
    c.model.intermediate_size = 256
    c.model.vocab_size = 256
    c.model.dtype = "float32"
    c.model.scan_layers = True   # compiles faster; scan == unrolled is tested in test_scan_remat
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    c.train.batch_size = 16
    c.train.seq_len = 16
    c.train.grad_accum_steps = grad_accum_steps
    c.train.microbatch_per_device = 0
    c.train.grad_reduce = grad_reduce
    # no warmup: the first update already moves the parameters, so the losses and gradients
    # of steps 2 and 3 depend on the sharded optimizer update too
    c.optim.warmup_steps = 0
    c.optim.peak_lr = 1e-3
    c.optim.decay_steps = 100
    # Adam's eps above the rounding noise of gradients that are exactly zero in exact
    # arithmetic (the key bias: softmax ignores a shift): at 1e-8 that noise, divided by its
    # own sqrt(v), becomes a random lr-sized step that differs between reduction orders and
    # feeds every later step; at 1e-6 it moves nothing, and real gradients (>= 1e-4) are
    # unaffected, so the 3-step comparison holds to fp32 rounding (RTOL).
    c.optim.eps = 1e-6
    c.mesh.shape = ml_collections.ConfigDict(dict(zip(MESH_AXES, mesh_shape)))
    return c


# ================================================================================================
# Worker (runs with 8 fake CPU devices)
def _flat(tree):
    import jax
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if x.size == 0:
            continue
        scale = max(float(np.max(np.abs(y))), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def _expected_param_specs(model_cfg, mesh):
    """keystr(pure-dict path) -> NamedSharding the rules give each parameter."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from pythia_jax import sharding as shd
    from pythia_jax.model import abstract_model

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(model_cfg), nnx.Param)):
        shape = var.get_value().shape
        spec = shd.logical_to_spec(var.logical_axes, shape=shape, mesh=mesh)
        key = "".join(f"[{p!r}]" for p in path)
        out[key] = (NamedSharding(mesh, spec), len(shape), tuple(var.logical_axes))
    return out


def _sharding_problems(tree, expected, mesh, what):
    """Leaves whose sharding differs from the rules (`expected` keyed by param keystr suffix)."""
    import jax
    problems, matched = [], 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(p)
        hit = [k for k in expected if key.endswith(k)]
        if not hit:
            continue
        want, ndim, axes = expected[max(hit, key=len)]
        matched += 1
        if not want.is_equivalent_to(x.sharding, ndim):
            problems.append(f"{what}{key}: {x.sharding.spec} != rules {want.spec} for {axes}")
    return problems, matched


def _case_key(mesh_shape, accum, reduce) -> str:
    return (f"{mesh_shape}" + (f" accum={accum}" if accum else "")
            + (f" reduce={reduce}" if reduce != "auto" else ""))


def _gradient_shapes(setup) -> set:
    """Every shape (size-1 dims dropped) a gradient can have in the compiled step: the whole
    parameter, one device's shard, and both per layer (scanned layers stack on dim 0)."""
    L = setup.model_cfg.num_layers
    out = set()
    for a, sh in zip(jax_leaves(setup.abstract_state.params),
                     jax_leaves(setup.state_shardings.params)):
        for shape in (tuple(a.shape), tuple(sh.shard_shape(a.shape))):
            out.add(tuple(d for d in shape if d != 1))
            if len(shape) > 1 and shape[0] == L:
                out.add(tuple(d for d in shape[1:] if d != 1))
    return out


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _reduce_modes(mesh_shape, host_params, tok, accum: int = 2) -> dict:
    """Loss and gradients of one batch (`train._grads`, grad_accum=2) with the gradients reduced
    per microbatch and once per step, and where the compiled programs reduce: the bytes one
    device sends through all-reduce / reduce-scatter per step inside the accumulation loop
    (or a layer loop within it) and after it, and the in-loop reductions of gradient shape."""
    import math

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pythia_jax import sharding as shd
    from pythia_jax import train

    out: dict = {"modes": {}}
    values = {}
    for mode in ("microbatch", "step"):
        cfg = tiny_train_config(mesh_shape, accum, grad_reduce=mode)
        mesh = train.make_mesh(cfg)
        _, setup = train.create_train_state(cfg, mesh, init=False)
        p_sh = setup.state_shardings.params

        def grads(params, inputs, targets, setup=setup, mesh=mesh):
            with shd.logical_rules(mesh):
                return train._grads(setup, params, inputs, targets)

        fn = jax.jit(grads, in_shardings=(p_sh, setup.batch_sharding, setup.batch_sharding),
                     out_shardings=(NamedSharding(mesh, P()), p_sh))
        args = (jax.device_put(host_params, p_sh),
                jax.device_put(tok[:, :-1], setup.batch_sharding),
                jax.device_put(tok[:, 1:], setup.batch_sharding))
        compiled = fn.lower(*args).compile()
        loss, g = compiled(*args)
        values[mode] = (float(loss), _flat(g))
        grad_shapes = _gradient_shapes(setup)
        in_loop = after = 0
        grad_shaped = []
        for c in shd.hlo_collectives(compiled.as_text()):
            if c["op"] not in REDUCE_OPS or c["group"] <= 1:
                continue
            runs = math.prod(n or 1 for n in c["loops"])
            if c["loops"]:
                in_loop += c["bytes"] * runs
                for _, shape in c["shapes"]:
                    if tuple(d for d in shape if d != 1) in grad_shapes and len(shape) > 0:
                        grad_shaped.append(f"{c['op']} {shape} in loops {c['loops']}")
            else:
                after += c["bytes"]
        out["modes"][mode] = {"resolved": setup.grad_reduce, "accum": setup.grad_accum,
                              "in_loop_bytes": in_loop, "after_loop_bytes": after,
                              "grad_shaped_in_loop": grad_shaped}
    (l_mb, g_mb), (l_st, g_st) = values["microbatch"], values["step"]
    out["loss_rel"] = abs(l_st - l_mb) / abs(l_mb)
    out["grads_rel"] = _max_rel(g_st, g_mb)
    out["param_bytes"] = sum(4 * int(np.prod(a.shape)) for a in
                             jax_leaves(setup.abstract_state.params))
    return out


def _worker(out_dir: str) -> None:
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pythia_jax import checkpoint as ckpt_lib
    from pythia_jax import hf, pretrained
    from pythia_jax import sharding as shd
    from pythia_jax import train
    from pythia_jax.config import ModelConfig
    from pythia_jax.model import GPTNeoX, sharded_model

    assert jax.device_count() == 8, jax.devices()
    out = pathlib.Path(out_dir)
    results: dict = {"cases": {}}
    rng = np.random.RandomState(0)
    tokens = [rng.randint(0, 256, size=(16, 17)).astype(np.int32) for _ in range(3)]

    def batches_for(setup):
        return [{"inputs": jax.device_put(t[:, :-1], setup.batch_sharding),
                 "targets": jax.device_put(t[:, 1:], setup.batch_sharding)} for t in tokens]

    def run(mesh_shape, accum=0, devices=None, init_from=None, reduce="auto"):
        """Three train steps. The state is initialized directly sharded on this mesh, or (to
        save compile time) `init_from`'s host values are placed with the setup's shardings."""
        cfg = tiny_train_config(mesh_shape, accum, grad_reduce=reduce)
        mesh = train.make_mesh(cfg, devices=devices)
        if init_from is None:
            state, setup = train.create_train_state(cfg, mesh)
        else:
            _, setup = train.create_train_state(cfg, mesh, init=False)
            state = jax.device_put(init_from, setup.state_shardings)
        state0 = _flat(state.params)
        step = train.make_train_step(setup, donate=False)
        b = batches_for(setup)
        s1, m1 = step(state, b[0])
        s2, m2 = step(s1, b[1])
        s3, m3 = step(s2, b[2])
        expected = _expected_param_specs(setup.model_cfg, mesh)
        problems, n_params = _sharding_problems(s3.params, expected, mesh, "params")
        p_opt, n_opt = _sharding_problems(s3.opt_state, expected, mesh, "opt_state")
        return {
            "cfg": cfg, "mesh": mesh, "setup": setup, "state": s3,
            "host_state0": jax.device_get(state), "init_params": state0,
            "step_losses": [float(m["loss"]) for m in (m1, m2, m3)],
            "grad_norms": [float(m["grad_norm"]) for m in (m1, m2, m3)],
            "lrs": [float(m["lr"]) for m in (m1, m2, m3)],
            # Adam's moments after one update are the (clipped) gradients of step 1:
            # mu = (1 - b1) g, nu = (1 - b2) g^2; after three, they mix in steps 2 and 3.
            "opt1": _flat(s1.opt_state),
            "params": _flat(s3.params), "opt": _flat(s3.opt_state),
            "problems": problems + p_opt, "n_params": n_params, "n_opt": n_opt,
            "grad_accum": setup.grad_accum, "grad_reduce": setup.grad_reduce,
            "sharded_leaves": sum(1 for x in jax.tree.leaves(s3.params)
                                  if x.addressable_shards[0].data.shape != x.shape),
        }

    ref = run((1, 1, 1), devices=jax.devices()[:1])
    results["reference"] = {"step_losses": ref["step_losses"], "lrs": ref["lrs"]}
    cases = [(m, 0, "auto") for m in MESHES] + ACCUM_CASES
    for mesh_shape, accum, reduce in cases:
        direct = mesh_shape in DIRECT_INIT and not accum
        r = run(mesh_shape, accum, init_from=None if direct else ref["host_state0"],
                reduce=reduce)
        key = _case_key(mesh_shape, accum, reduce)
        results["cases"][key] = {
            "direct_init": direct,
            "init_rel": _max_rel(r["init_params"], ref["init_params"]),
            "step_loss_rel": max(abs(a - b) / abs(b) for a, b in zip(r["step_losses"],
                                                                     ref["step_losses"])),
            "grad_norm_rel": max(abs(a - b) / abs(b) for a, b in zip(r["grad_norms"],
                                                                     ref["grad_norms"])),
            "grads_rel": _max_rel(r["opt1"], ref["opt1"]),
            "opt_state_rel": _max_rel(r["opt"], ref["opt"]),
            # informational: Adam divides by sqrt(v), so elements whose gradient is rounding
            # noise (the key bias, which the softmax ignores) differ at the lr * 1e-1 level
            "params_after_3_steps_rel": _max_rel(r["params"], ref["params"]),
            "params_moved": max(float(np.max(np.abs(r["params"][k] - ref["init_params"][k])))
                                for k in r["params"]),
            "sharding_problems": r["problems"], "n_params": r["n_params"],
            "n_opt_leaves_checked": r["n_opt"], "grad_accum": r["grad_accum"],
            "grad_reduce": r["grad_reduce"],
            "sharded_leaves": r["sharded_leaves"],
        }
        if mesh_shape == (2, 4, 1) and not accum:
            saved = r

    # ---- gradients reduced per microbatch vs once per step: values and the compiled HLO ----
    results["reduce"] = {}
    for mesh_shape in REDUCE_MESHES:
        results["reduce"][str(mesh_shape)] = _reduce_modes(mesh_shape, ref["host_state0"].params,
                                                           tokens[0])

    # ---- checkpoint saved on (2,4,1), restored on (8,1,1) here and on (1,1,1) by the parent --
    workdir = out / "ckpt_run"
    ck = train.Checkpoints(str(workdir), saved["cfg"], saved["setup"])
    meta = {"model": ckpt_lib.config_to_json(saved["setup"].model_cfg), "batch_size": 16,
            "seq_len": 16}
    ck.save(saved["state"], meta)
    ck.close()
    np.savez(out / "ckpt_expected.npz", **{"p" + k: v for k, v in saved["params"].items()},
             **{"o" + k: v for k, v in saved["opt"].items()})
    cfg8 = tiny_train_config((8, 1, 1))
    mesh8 = train.make_mesh(cfg8)
    _, setup8 = train.create_train_state(cfg8, mesh8, init=False)
    ck8 = train.Checkpoints(str(workdir), cfg8, setup8)
    restored, _ = ck8.restore(3)
    ck8.close()
    expected = _expected_param_specs(setup8.model_cfg, mesh8)
    problems, _ = _sharding_problems(restored.params, expected, mesh8, "params")
    p2, _ = _sharding_problems(restored.opt_state, expected, mesh8, "opt_state")
    results["ckpt_8"] = {
        "params_equal": all(np.array_equal(a, saved["params"][k])
                            for k, a in _flat(restored.params).items()),
        "opt_equal": all(np.array_equal(a, saved["opt"][k])
                         for k, a in _flat(restored.opt_state).items()),
        "step": int(restored.step),
        "sharding_problems": problems + p2,
        "devices": len(restored.params["embed_in"]["embedding"].sharding.device_set),
    }

    # ---- sharded HF loading (4 heads: on tensor=8 the heads stay whole) -----------------------
    cfg4 = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                       vocab_size=256)
    model = GPTNeoX(cfg4, rngs=nnx.Rngs(3))
    truth = _flat(nnx.state(model, nnx.Param))
    hf_dir = out / "hf_tiny"
    hf.save_pretrained(model, hf_dir, tokenizer=False)
    reads: list = []
    original = jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):
        def recording(index):
            block = callback(index)
            reads.append((tuple(shape), tuple(np.shape(block)),
                          tuple(sharding.shard_shape(tuple(shape)))))
            return block
        return original(shape, sharding, recording, *args, **kwargs)

    results["hf"] = {}
    jax.make_array_from_callback = spy
    try:
        for mesh_shape in [(1, 2, 4), (1, 1, 8), (2, 2, 2)]:
            reads.clear()
            mesh = shd.make_mesh(mesh_shape)
            loaded = pretrained.from_pretrained(hf_dir, mesh=mesh)
            state = nnx.state(loaded, nnx.Param)
            got = _flat(state)
            expected = _expected_param_specs(cfg4, mesh)
            problems = []
            for path, var in nnx.to_flat_state(state):
                key = "".join(f"[{p!r}]" for p in path)
                want, ndim, axes = expected[key]
                if not want.is_equivalent_to(var.get_value().sharding, ndim):
                    problems.append(f"{key}: {var.get_value().sharding.spec} != {want.spec}")
            results["hf"][str(mesh_shape)] = {
                "equal": all(np.array_equal(got[k], truth[k]) for k in truth),
                "sharding_problems": problems,
                "reads": len(reads),
                # each callback returns exactly its device's block, never the whole tensor
                "partial_reads": sum(1 for full, blk, shard in reads if shard != full),
                "wrong_blocks": [str(r) for r in reads if r[1] != r[2]],
            }
    finally:
        jax.make_array_from_callback = original

    # ---- model.sharded_model: the same init values, created sharded ------------------------------
    mesh = shd.make_mesh((2, 2, 2))
    sm = sharded_model(cfg4, mesh, seed=5)
    dense = _flat(nnx.state(GPTNeoX(cfg4, rngs=nnx.Rngs(5)), nnx.Param))
    got = _flat(nnx.state(sm, nnx.Param))
    problems = []
    expected = _expected_param_specs(cfg4, mesh)
    for path, var in nnx.to_flat_state(nnx.state(sm, nnx.Param)):
        key = "".join(f"[{p!r}]" for p in path)
        want, ndim, _ = expected[key]
        if not want.is_equivalent_to(var.get_value().sharding, ndim):
            problems.append(key)
    results["sharded_model"] = {"rel": _max_rel(got, dense), "sharding_problems": problems}

    (out / "results.json").write_text(json.dumps(results, indent=1))


# ================================================================================================
# Tests in the main process (1 CPU device)
def test_mesh_shape_resolution():
    from pythia_jax.sharding import mesh_shape
    assert mesh_shape({"data": -1, "fsdp": 4, "tensor": 1}, 32) == (8, 4, 1)
    assert mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    assert mesh_shape(None, 8) == (8, 1, 1)
    assert mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad, msg in [({"data": -1, "fsdp": -1}, "at most one"), ({"data": 3}, "needs 3"),
                     ({"data": -1, "fsdp": 3}, "not divisible"), ({"model": 2}, "unknown axis"),
                     ({"data": 0}, "positive")]:
        with pytest.raises(ValueError, match=msg):
            mesh_shape(bad, 8)


def test_make_mesh_from_configdict_on_one_device():
    import ml_collections

    from pythia_jax.sharding import make_mesh
    mesh = make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    import jax
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_rules_table():
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from pythia_jax.sharding import logical_to_spec
    mesh = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    qkv = ("layers", "embed", "heads", "qkv", "head_dim")
    assert logical_to_spec(qkv) == P(None, "fsdp", "tensor", None, None)
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    # a mesh axis shards at most one dimension
    assert logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    # with shape + mesh: axes that do not divide the dimension are dropped
    assert logical_to_spec(qkv, shape=(2, 64, 3, 3, 16), mesh=mesh) == P(None, "fsdp", None,
                                                                          None, None)
    assert logical_to_spec(("batch", "length"), shape=(4, 8), mesh=mesh) == P("data", None)
    assert logical_to_spec(("batch", "length"), shape=(8, 8), mesh=mesh) == P(("data", "fsdp"),
                                                                              None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_tree_shardings_follow_param_axes_and_replicate_the_rest():
    import jax
    import optax
    from flax import nnx

    from pythia_jax.config import ModelConfig
    from pythia_jax.model import abstract_model
    from pythia_jax.sharding import make_mesh, tree_shardings
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                      vocab_size=256)
    params = nnx.state(abstract_model(cfg), nnx.Param)
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    mesh = make_mesh((1, 1, 1))
    sh = tree_shardings({"params": params, "opt": opt}, mesh)
    leaves = jax.tree.leaves(sh)
    n_params = len(jax.tree.leaves(params))
    # every params leaf + mu + nu + the count, all NamedShardings on this mesh
    assert len(leaves) == 3 * n_params + 1
    assert all(s.mesh == mesh for s in leaves)


HLO_WITH_LOOPS = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%layer_body (p: (s32[], f32[64,16])) -> (s32[], f32[64,16]) {
  %p = (s32[], f32[64,16]{1,0}) parameter(0)
  %g = f32[64,16]{1,0} get-tuple-element(%p), index=1
  %ar = f32[64,16]{1,0} all-reduce(%g), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,16]{1,0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[64,16])) -> pred[] {
  %p = (s32[], f32[64,16]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%cond_lt (p: (s32[], f32[64,16])) -> pred[] {
  %n = s32[]{:T(128)} constant(3)
  %p = (s32[], f32[64,16]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT, backend_config={"flag_configs":[]}
}

%accum_body (p: (s32[], f32[64,16])) -> (s32[], f32[64,16]) {
  %p = (s32[], f32[64,16]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[64,16]{1,0}) while(%p), condition=%cond_lt, body=%layer_body
}

ENTRY %main (x: f32[64,16]) -> f32[16,16] {
  %x = f32[64,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[64,16]{1,0}) tuple(%z, %x)
  %w = (s32[], f32[64,16]{1,0}) while(%t), condition=%cond, body=%accum_body, backend_config={"known_trip_count":{"n":"16"}}
  %y = f32[64,16]{1,0} get-tuple-element(%w), index=1
  %ag = bf16[8,16]{1,0} all-gather(%x), channel_id=3, replica_groups={{0,1},{2,3}}, dimensions={0}
  ROOT %rs = f32[16,16]{1,0} reduce-scatter(%y), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
}
"""


def test_hlo_collectives_places_each_collective_in_its_loops():
    from pythia_jax.sharding import hlo_collectives
    found = {c["op"]: c for c in hlo_collectives(HLO_WITH_LOOPS)}
    assert set(found) == {"all-reduce", "reduce-scatter", "all-gather"}
    ar, rs, ag = found["all-reduce"], found["reduce-scatter"], found["all-gather"]
    # inside the layer loop (trip count from its `i < 3` condition, as libtpu leaves it)
    # inside the accumulation loop (XLA's known_trip_count): runs 16 x 3 times per call
    assert ar["loops"] == [16, 3] and ar["group"] == 4 and ar["bytes"] == 64 * 16 * 4
    assert ar["shapes"] == [("f32", (64, 16))] and ar["computation"] == "layer_body"
    # after the loop; a reduce-scatter sends its operand (result x group)
    assert rs["loops"] == [] and rs["group"] == 4 and rs["bytes"] == 16 * 16 * 4 * 4
    assert ag["loops"] == [] and ag["group"] == 2 and ag["bytes"] == 8 * 16 * 2
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_collectives("HloModule empty")


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__, "worker", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"8-device worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_train_step_on_every_mesh_matches_one_device(eight_device_results):
    _, res = eight_device_results
    ref = res["reference"]
    assert min(ref["lrs"]) > 0  # every update moves the parameters
    assert sum(c["direct_init"] for c in res["cases"].values()) == len(DIRECT_INIT)
    expected = {f"{m}" for m in MESHES} | {_case_key(*c) for c in ACCUM_CASES}
    assert set(res["cases"]) == expected
    for name, c in res["cases"].items():
        assert c["sharding_problems"] == [], name
        assert c["n_params"] == 16 and c["n_opt_leaves_checked"] >= 32, name
        assert c["init_rel"] < RTOL, (name, c)
        assert c["grads_rel"] < RTOL, (name, c)
        assert c["step_loss_rel"] < RTOL and c["grad_norm_rel"] < RTOL, (name, c)
        assert c["opt_state_rel"] < RTOL, (name, c)
        assert c["params_moved"] > 1e-4, (name, c)  # the updates were applied
    # meshes that split parameters do split them (fsdp: embed; tensor: heads / mlp / vocab)
    assert res["cases"]["(8, 1, 1)"]["sharded_leaves"] == 0
    for name in ("(2, 4, 1)", "(2, 2, 2)", "(1, 1, 8)", "(1, 8, 1)"):
        assert res["cases"][name]["sharded_leaves"] >= 6, name
    assert res["cases"]["(2, 2, 2) accum=2"]["grad_accum"] == 2
    # auto: the fsdp mesh keeps the sharded (per-microbatch) accumulator, the data mesh does not
    assert res["cases"]["(2, 2, 2) accum=2"]["grad_reduce"] == "microbatch"
    assert res["cases"]["(2, 2, 2) accum=2 reduce=step"]["grad_reduce"] == "step"
    assert res["cases"]["(8, 1, 1) accum=2"]["grad_reduce"] == "step"


@pytest.mark.slow
def test_gradients_reduced_once_per_step_match_and_leave_the_loop(eight_device_results):
    """grad_reduce="step" vs "microbatch" (grad_accum=2): the same loss and gradients, and in
    the compiled program no reduction of gradient shape inside the accumulation loop."""
    _, res = eight_device_results
    assert set(res["reduce"]) == {f"{m}" for m in REDUCE_MESHES}
    for name, r in res["reduce"].items():
        mb, st = r["modes"]["microbatch"], r["modes"]["step"]
        assert mb["accum"] == st["accum"] == 2, name
        assert r["loss_rel"] < RTOL and r["grads_rel"] < RTOL, (name, r)
        assert st["grad_shaped_in_loop"] == [], (name, st)
        # every mesh here splits the batch
        # positive control: the per-microbatch program does reduce gradients in the loop
        assert mb["grad_shaped_in_loop"], (name, mb)
        # once per step: every gradient (this device's tensor slice of it), after the loop
        tensor = int(name.strip("()").split(",")[2])
        assert st["after_loop_bytes"] >= r["param_bytes"] / tensor, (name, r)
        assert st["in_loop_bytes"] + st["after_loop_bytes"] < (
            mb["in_loop_bytes"] + mb["after_loop_bytes"]), (name, r)
        if name in ("(8, 1, 1)", "(2, 4, 1)"):
            # no tensor axis: nothing at all is reduced inside the loop
            assert st["in_loop_bytes"] == 0, (name, st)


@pytest.mark.slow
def test_checkpoint_from_2x4_mesh_restores_on_8_devices(eight_device_results):
    _, res = eight_device_results
    c = res["ckpt_8"]
    assert c["params_equal"] and c["opt_equal"] and c["step"] == 3
    assert c["sharding_problems"] == [] and c["devices"] == 8


@pytest.mark.slow
def test_checkpoint_from_2x4_mesh_restores_on_one_device(eight_device_results):
    import jax

    from pythia_jax import train
    out, _ = eight_device_results
    expected = np.load(out / "ckpt_expected.npz")
    cfg = tiny_train_config((1, 1, 1))
    mesh = train.make_mesh(cfg)
    _, setup = train.create_train_state(cfg, mesh, init=False)
    ck = train.Checkpoints(str(out / "ckpt_run"), cfg, setup)
    state, _ = ck.restore(3)
    ck.close()
    n = 0
    for prefix, tree in (("p", state.params), ("o", state.opt_state)):
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = prefix + jax.tree_util.keystr(p)
            np.testing.assert_array_equal(np.asarray(x), expected[key], err_msg=key)
            assert x.sharding.device_set == {jax.devices()[0]}
            n += 1
    assert n == len(expected.files)


@pytest.mark.slow
def test_from_pretrained_places_each_tensor_sharded(eight_device_results):
    _, res = eight_device_results
    for mesh, r in res["hf"].items():
        assert r["equal"], mesh
        assert r["sharding_problems"] == [], mesh
        assert r["reads"] >= 16, mesh
        assert r["partial_reads"] >= 6 and r["wrong_blocks"] == [], (mesh, r)


@pytest.mark.slow
def test_sharded_model_init_matches_dense_init(eight_device_results):
    _, res = eight_device_results
    assert res["sharded_model"]["sharding_problems"] == []
    assert res["sharded_model"]["rel"] < 1e-6


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
