"""pythia_jax.fused_loss: the fused output layer + cross-entropy Pallas kernel (interpret mode on
CPU) against `train.cross_entropy` of the einsum logits, values and gradients (hidden and
embedding), fp32 and bf16, sizes that are not multiples of the blocks, bad blocks; the train
step with `train.fused_loss=True` against the plain one; a deviceless v5e compile (Mosaic
lowering, VMEM) at a Pythia shape."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pythia_jax import fused_loss as fl
from pythia_jax import train


def _inputs(T, V, D, dtype=jnp.float32, seed=0, lead=None):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (T,) if lead is None else lead
    h = jax.random.normal(k[0], shape + (D,), jnp.float32)
    e = jax.random.normal(k[1], (V, D), jnp.float32) * (2.0 / np.sqrt(D))
    t = jax.random.randint(k[2], shape, 0, V)
    return h.astype(dtype), e.astype(dtype), t


def _plain(h, e, t, precision=None):
    """What the model + train.cross_entropy compute: einsum logits in fp32, then the loss."""
    eq = "...d,vd->...v"
    return train.cross_entropy(jnp.einsum(eq, h, e, preferred_element_type=jnp.float32,
                                          precision=precision), t)


def _value_and_grads(fn, h, e):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, e)


def _rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


@pytest.mark.parametrize("T,V,D,bt,bv,options", [
    (256, 512, 64, 128, 128, {}),    # multiples of the blocks: 2 token x 4 vocab tiles
    (300, 1000, 64, 128, 256, {}),   # neither: tokens padded to 384, vocab to 1024
    (300, 1000, 64, 128, 256, {"dh_in_forward": False}),  # the separate dhidden kernel
    (300, 1000, 64, 128, 256, {"store_probs": True}),     # dembed from stored probabilities
    (300, 1000, 64, 128, 256, {"store_probs": True, "dh_in_forward": False}),
], ids=["divisible", "padded", "recompute", "store", "store_recompute"])
def test_fp32_values_and_gradients_match_the_plain_loss(T, V, D, bt, bv, options):
    h, e, t = _inputs(T, V, D)
    want, (dh_want, de_want) = _value_and_grads(
        lambda h, e: _plain(h, e, t, precision="highest"), h, e)
    got, (dh, de) = _value_and_grads(
        lambda h, e: fl.fused_cross_entropy(h, e, t, block_t=bt, block_v=bv, **options), h, e)
    loss_only = jax.jit(lambda h, e: fl.fused_cross_entropy(h, e, t, block_t=bt, block_v=bv))
    assert float(loss_only(h, e)) == pytest.approx(float(want), rel=1e-5)  # no-grad kernel
    assert got.dtype == jnp.float32 and dh.dtype == h.dtype and de.dtype == e.dtype
    assert dh.shape == h.shape and de.shape == e.shape
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert _rel_err(dh, dh_want) < 1e-5
    assert _rel_err(de, de_want) < 1e-5


@pytest.mark.parametrize("store_probs", [False, True], ids=["recompute_logits", "store_probs"])
def test_per_token_losses_with_leading_dims_and_a_weighted_cotangent(store_probs):
    """reduction="none" keeps targets' shape; a non-uniform per-token cotangent (weights) reaches
    both gradients as in the plain loss (the kernels scale each token's row by its own g)."""
    B, T, V, D = 2, 96, 640, 32
    h, e, t = _inputs(T, V, D, lead=(B, T), seed=1)
    w = jax.random.uniform(jax.random.PRNGKey(7), (B, T))
    w = w.at[0, :10].set(0.0)

    def plain_tok(h, e):
        logits = jnp.einsum("btd,vd->btv", h, e, preferred_element_type=jnp.float32,
                            precision="highest")
        lse = jax.nn.logsumexp(logits, -1)
        return lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]

    def fused_tok(h, e):
        return fl.fused_cross_entropy(h, e, t, block_t=128, block_v=128, reduction="none",
                                      store_probs=store_probs)

    per_tok = jax.jit(fused_tok)(h, e)
    assert per_tok.shape == (B, T) and per_tok.dtype == jnp.float32
    np.testing.assert_allclose(per_tok, jax.jit(plain_tok)(h, e), rtol=1e-5, atol=1e-5)
    want = _value_and_grads(lambda h, e: jnp.sum(w * plain_tok(h, e)), h, e)[1]
    got = _value_and_grads(lambda h, e: jnp.sum(w * fused_tok(h, e)), h, e)[1]
    for g, gw in zip(got, want):
        assert _rel_err(g, gw) < 1e-5
    assert float(jnp.max(jnp.abs(got[0][0, :10]))) == 0.0  # zero weight: zero dhidden


@pytest.mark.parametrize("store_probs", [False, True], ids=["recompute_logits", "store_probs"])
def test_bf16_error_is_that_of_the_plain_bf16_loss(store_probs):
    """bf16 inputs, fp32 accumulation: the kernel's error against an fp32 reference (on the same
    bf16-rounded inputs) is within 2x the plain bf16 path's own error, plus a small floor; also
    with the probabilities stored in bf16 for the backward. Some tokens are made confident
    (p_target near 1, where dlogits = p - onehot cancels)."""
    T, V, D = 256, 768, 128
    h, e, t = _inputs(T, V, D, dtype=jnp.bfloat16, seed=2)
    e = e.at[t[:64]].add(0.5 * h[:64].astype(jnp.float32).astype(e.dtype))  # confident rows
    ref, (dh_ref, de_ref) = _value_and_grads(
        lambda h, e: _plain(h, e, t, precision="highest"),
        h.astype(jnp.float32), e.astype(jnp.float32))
    plain, (dh_p, de_p) = _value_and_grads(lambda h, e: _plain(h, e, t), h, e)
    got, (dh, de) = _value_and_grads(
        lambda h, e: fl.fused_cross_entropy(h, e, t, block_t=128, block_v=256,
                                            store_probs=store_probs), h, e)
    assert dh.dtype == jnp.bfloat16 and de.dtype == jnp.bfloat16
    assert abs(float(got) - float(ref)) <= 2 * abs(float(plain) - float(ref)) + 1e-3
    for g, gp, gr in ((dh, dh_p, dh_ref), (de, de_p, de_ref)):
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - gr)))
        err_plain = float(jnp.max(jnp.abs(gp.astype(jnp.float32) - gr)))
        scale = float(jnp.max(jnp.abs(gr)))
        assert err <= 2 * err_plain + 1e-2 * scale, (err, err_plain, scale)


@pytest.mark.parametrize("kwargs,match", [
    ({"block_t": 100}, "block_t=100 must be a positive multiple of 128"),
    ({"block_v": 0}, "block_v=0 must be a positive multiple of 128"),
    ({"block_v": 200}, "block_v=200 .*V=1000"),
    ({"block_t": True}, "block_t=True"),
    ({"reduction": "sum"}, "reduction"),
])
def test_bad_blocks_and_arguments_raise_clear_errors(kwargs, match):
    h, e, t = _inputs(300, 1000, 64)
    with pytest.raises(fl.FusedLossError, match=match):
        fl.fused_cross_entropy(h, e, t, **kwargs)
    assert issubclass(fl.FusedLossError, ValueError)


def test_bad_shapes_raise_clear_errors():
    h, e, t = _inputs(64, 256, 32)
    with pytest.raises(fl.FusedLossError, match="embed"):
        fl.fused_cross_entropy(h, e[:, :16], t)
    with pytest.raises(fl.FusedLossError, match="targets"):
        fl.fused_cross_entropy(h, e, t[:10])
    with pytest.raises(fl.FusedLossError, match="integer"):
        fl.fused_cross_entropy(h, e, t.astype(jnp.float32))


@pytest.mark.parametrize("D,dtype", [(512, jnp.bfloat16), (768, jnp.bfloat16),
                                     (1024, jnp.bfloat16), (2048, jnp.bfloat16),
                                     (512, jnp.float32), (1024, jnp.float32)])
def test_default_blocks_fit_the_vmem_budget(D, dtype):
    for dh_in_forward, store, kernels in (
            (True, False, ("fwd", "fwd_pe", "de")), (False, False, ("fwd", "dh", "de")),
            (True, True, ("fwd", "fwd_pe_store", "de_stored")),
            (False, True, ("fwd", "fwd_store", "dh", "de_stored"))):
        bt, bv = fl.default_blocks(16 * 2048, 50304, D, dtype, dh_in_forward, store)
        assert bt % 128 == 0 and bv % 128 == 0 and bt >= 128 and bv >= 128
        used = fl.vmem_bytes(bt, bv, D, jnp.dtype(dtype).itemsize)
        assert max(used[k] for k in kernels) <= fl.VMEM_BUDGET_BYTES, used
    # clipped to the (padded) sizes of small inputs
    assert fl.default_blocks(200, 300, 64, jnp.float32) == (256, 384)


# ------------------------------------------------------------------------------------------------
# The train step
def _tiny_config(**overrides):
    from pythia_jax.configs import smoke
    c = smoke.get_config()
    values = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
              "model.intermediate_size": 128, "model.vocab_size": 300,
              "model.dtype": "float32", "model.scan_layers": False,
              "data.build_from_text": "", "data.eval_path": "",
              "train.batch_size": 8, "train.seq_len": 16, "train.grad_accum_steps": 1,
              **overrides}
    from test_train import set_fields
    return set_fields(c, values)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x), np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_train_step_with_fused_loss_equals_the_plain_step():
    """train.fused_loss=True in interpret mode: the train step's loss and gradients
    (`train._grads`, what `make_train_step` differentiates; one microbatch of 128 tokens,
    vocabulary 300 padded to a 384 tile) equal the plain loss's; without interpret mode on CPU
    the flag leaves the plain loss in place (no Pallas call)."""
    from pythia_jax.sharding import logical_rules

    rows = np.random.RandomState(0).randint(0, 300, (8, 17)).astype(np.int32)
    out, state = {}, None
    for fused in (False, True):
        cfg = _tiny_config(**{"train.fused_loss": fused})
        mesh = train.make_mesh(cfg)
        init, setup = train.create_train_state(cfg, mesh, init=state is None)
        state = init if state is None else state  # one init (same seed and shardings)
        assert setup.fused_loss is fused
        inputs = jax.device_put(rows[:, :-1], setup.batch_sharding)
        targets = jax.device_put(rows[:, 1:], setup.batch_sharding)

        def grads(params, setup=setup, mesh=mesh):
            with logical_rules(mesh):
                return train._grads(setup, params, inputs, targets)

        with fl.interpret_mode():
            assert ("pallas_call" in str(jax.make_jaxpr(grads)(state.params))) is fused
            loss, g = jax.jit(grads)(state.params)
        assert "pallas_call" not in str(jax.make_jaxpr(grads)(state.params))
        out[fused] = (float(loss), _flat(g))
    (l0, g0), (l1, g1) = out[False], out[True]
    assert l0 > 5.0  # ~log(300): a real loss, not a trivially equal zero
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert set(g1) == set(g0) and len(g0) > 10
    for k in g0:
        scale = max(float(np.max(np.abs(g0[k]))), 1e-30)
        assert scale > 1e-30, k
        assert float(np.max(np.abs(g1[k] - g0[k]))) <= 1e-5 * scale, k


@pytest.mark.parametrize("field", ["fused_loss", "fused_loss_store_probs"])
def test_fused_loss_fields_are_validated(field):
    cfg = _tiny_config()
    del cfg.train[field]
    cfg.train[field] = "yes"
    with pytest.raises(train.TrainConfigError, match=f"train.{field}:"):
        train.create_train_state(cfg, train.make_mesh(cfg), init=False)
    from pythia_jax.configs import pythia
    assert pythia.get_config("70m").train[field] is True  # the default (bench/RESULTS.md)


# ------------------------------------------------------------------------------------------------
# Deviceless TPU compile (libtpu): the Mosaic lowering and VMEM at a Pythia-70m shape
@pytest.mark.parametrize("store_probs,dtype", [(False, jnp.bfloat16), (True, jnp.bfloat16),
                                               (False, jnp.float32), (True, jnp.float32)],
                         ids=["bf16", "bf16_store_probs", "fp32", "fp32_store_probs"])
def test_v5e_compile_forward_and_backward_within_vmem(store_probs, dtype):
    from pythia_jax.attention.target import target_platform
    from pythia_jax.attention.tpu_compile import _kernel_vmem, libtpu_error, topology_desc

    err = libtpu_error()
    if err:
        pytest.fail(err)
    dev = topology_desc("v5e:1x1").devices[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    T, V, D = 2048, 50304, 512
    h = jax.ShapeDtypeStruct((T, D), dtype, sharding=sh)
    e = jax.ShapeDtypeStruct((V, D), dtype, sharding=sh)
    t = jax.ShapeDtypeStruct((T,), jnp.int32, sharding=sh)
    fn = jax.value_and_grad(lambda h, e, t: fl.fused_cross_entropy(h, e, t,
                                                                   store_probs=store_probs),
                            argnums=(0, 1))
    with target_platform("tpu"):
        compiled = jax.jit(fn).lower(h, e, t).compile()
    vmem = _kernel_vmem(compiled.as_text())
    names = " ".join(vmem)
    # the forward with softmax @ E, the dembed kernel (each with its stored-probability form)
    kernels = ("fwd_pe_store", "de_stored") if store_probs else ("fwd_pe", "de")
    for kernel in kernels:
        assert f"pythia_fused_ce_{kernel}_" in names, (kernel, names)
    assert len(vmem) == 2, names
    bt, bv = fl.default_blocks(T, V, D, dtype, store_probs=store_probs)
    estimate = fl.vmem_bytes(bt, bv, D, jnp.dtype(dtype).itemsize)
    for name, used in vmem.items():
        assert 0 < used <= 16 * 2**20, (name, used)
        kernel = kernels[0] if "fwd" in name else kernels[1]
        assert used <= estimate[kernel], (name, used, estimate)  # the estimate is an upper bound
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    # the kernels' CostEstimates: 4 + 4 (stored: 4 + 2) T Vp D FLOPs, Vp = V padded to the block
    Vp = -(-V // bv) * bv
    assert float(ca["flops"]) >= (6 if store_probs else 8) * T * Vp * D


def test_a_mesh_that_splits_the_vocabulary_keeps_the_plain_loss(caplog):
    """tensor > 1 splits embed_out's vocabulary: `sharded_cross_entropy` declines (None, with a
    warning) and `loss_fn` computes the plain loss from the hidden states."""
    from jax.sharding import AbstractMesh

    from pythia_jax.sharding import MESH_AXES, logical_rules

    h, e, t = _inputs(16, 256, 32, lead=(2, 8))
    with logical_rules(AbstractMesh((1, 1, 2), MESH_AXES)), fl.interpret_mode():
        assert fl.sharded_cross_entropy(h, e, t) is None
    assert "tensor=2" in caplog.text


# ------------------------------------------------------------------------------------------------
# On a mesh (a subprocess with 4 fake CPU devices): the kernel inside shard_map
MESH_CASES = {
    # name: (mesh shape, grad_accum_steps, fused); train.grad_reduce="step" throughout
    "one_batch": (("plain", (2, 2, 1), 1, False), ("fused", (2, 2, 1), 1, True)),
    "per_step_reduce": (("plain", (2, 2, 1), 1, False), ("fused", (2, 2, 1), 2, True)),
}


def _mesh_worker(out_path: str, cases: str) -> None:
    import json

    import ml_collections

    from pythia_jax.sharding import MESH_AXES, logical_rules

    rng = np.random.RandomState(1)
    rows = rng.randint(0, 300, (8, 17)).astype(np.int32)
    res, host_params = {}, None
    for name, shape, accum, fused in MESH_CASES[cases]:
        cfg = _tiny_config(**{"train.fused_loss": fused, "train.grad_reduce": "step",
                              "train.grad_accum_steps": accum})
        cfg.mesh.shape = ml_collections.ConfigDict(dict(zip(MESH_AXES, shape)))
        mesh = train.make_mesh(cfg)
        _, setup = train.create_train_state(cfg, mesh, init=False)
        if host_params is None:  # random parameters (no init compile), the same for each case
            host_params = jax.tree.map(
                lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                setup.abstract_state.params)
        params = jax.device_put(host_params, setup.state_shardings.params)
        inputs = jax.device_put(rows[:, :-1], setup.batch_sharding)
        targets = jax.device_put(rows[:, 1:], setup.batch_sharding)

        def grads(params, setup=setup, mesh=mesh):
            with logical_rules(mesh):
                return train._grads(setup, params, inputs, targets)

        with fl.interpret_mode():
            jaxpr = str(jax.make_jaxpr(grads)(params))
            loss, g = jax.jit(grads)(params)
        res[name] = {"kernel": "pallas_call" in jaxpr, "loss": float(loss),
                     "grads": {k: v.tolist() for k, v in _flat(g).items()}}
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.mark.parametrize("cases", sorted(MESH_CASES))
def test_on_a_mesh_in_shard_map_equals_the_plain_loss(tmp_path, cases):
    """data=2 x fsdp=2 (4 CPU devices): the fused loss inside shard_map (tokens split over the
    batch axes, the embedding gathered) equals the plain loss, in one batch ("one_batch") and in
    2 microbatches whose gradients are reduced once per step ("per_step_reduce": the kernel's
    shard_map nested in the step's manual one)."""
    import json
    import os
    import subprocess

    from conftest import REPO

    out = tmp_path / "mesh.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "worker", str(out), cases], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["plain"]["kernel"] is False
    base, r = res["plain"], res["fused"]
    assert r["kernel"] is True
    assert r["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert r["grads"].keys() == base["grads"].keys()
    for k, want in base["grads"].items():
        want, got = np.asarray(want), np.asarray(r["grads"][k])
        scale = max(float(np.max(np.abs(want))), 1e-30)
        assert float(np.max(np.abs(got - want))) <= 1e-5 * scale, k


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _mesh_worker(sys.argv[2], sys.argv[3])
