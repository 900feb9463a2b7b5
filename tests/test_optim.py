"""pythia_jax.optim: the NeoX v1.0 LR schedule, the weight-decay mask, AdamW vs torch, skipping."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pythia_jax import optim
from pythia_jax.config import ModelConfig
from pythia_jax.model import abstract_model

# Pythia-70m: peak 1e-3, min 1e-4, warmup W = 1430, decay E = 143000 (reference doc 3.3).
# Hand-computed from the formula (float64): n <= W: 1e-3 * n / 1430; otherwise
# n' = min(n, E - W) - W and lr = max(1e-4, 1e-3 * 0.5 * (1 + cos(pi * n' / 143000))).
HAND_70M = [
    (0, 0.0),                        # the first update uses lr 0
    (1, 6.993006993006994e-07),      # 1e-3 / 1430
    (715, 5.0e-04),                  # half way through the warmup
    (1429, 9.993006993006994e-04),
    (1430, 1.0e-03),                 # end of warmup: n <= W branch, exactly the peak
    (1431, 9.999999998793387e-04),   # n' = 1: 0.5e-3 (1 + cos(pi / 143000))
    (10000, 9.911641965803597e-04),  # n' = 8570   (doc: 9.9116e-4)
    (50000, 7.413579850981182e-04),  # n' = 48570  (doc: 7.4136e-4)
    (100000, 2.198675026350040e-04),  # n' = 98570 (doc: 2.1987e-4)
    (115138, 1.000060283007103e-04),  # n' = 113708: still above the floor
    (115139, 1.0e-04),               # cosine value 9.99994e-5 < min_lr: the floor is reached
    (141570, 1.0e-04),
    (143000, 1.0e-04),
    (500000, 1.0e-04),
]


def test_schedule_matches_hand_computed_neox_values():
    sched = optim.pythia_schedule(1e-3, 1e-4, 1430, 143000)
    for n, want in HAND_70M:
        got = float(sched(n))
        assert got == pytest.approx(want, rel=2e-6, abs=1e-12), (n, got, want)
        assert optim.pythia_lr(n, 1e-3, 1e-4, 1430, 143000) == pytest.approx(want, rel=1e-12)


def test_schedule_floor_crossing_and_period():
    sched = optim.pythia_schedule(1e-3, 1e-4, 1430, 143000)
    # the first step at the floor is 115139 (crossing at n = 1430 + acos(-0.8) / pi * 143000)
    crossing = 1430 + math.acos(-0.8) / math.pi * 143000
    assert 115138 < crossing < 115139
    assert float(sched(115138)) > 1e-4
    assert float(sched(115139)) == pytest.approx(1e-4, rel=1e-7)
    # a period of E - W (the common mistake) would give a different value mid-way
    wrong = 1e-3 * 0.5 * (1 + math.cos(math.pi * (50000 - 1430) / (143000 - 1430)))
    assert abs(float(sched(50000)) - wrong) > 1e-3 * wrong  # 0.6% apart; fp32 error is 1e-7
    # another size: 160m, peak 6e-4, n = 60000 -> 3.8407700254541454e-4 (hand-computed)
    s160 = optim.pythia_schedule(6e-4, 6e-5, 1430, 143000)
    assert float(s160(60000)) == pytest.approx(3.8407700254541454e-4, rel=2e-6)


def test_schedule_is_jittable_and_vectorized():
    sched = optim.pythia_schedule(1e-3, 1e-4, 1430, 143000)
    ns = jnp.array([n for n, _ in HAND_70M])
    got = jax.jit(jax.vmap(sched))(ns)
    np.testing.assert_allclose(np.asarray(got), [w for _, w in HAND_70M], rtol=2e-6, atol=1e-12)


def test_schedule_without_warmup_and_bad_settings():
    sched = optim.pythia_schedule(1e-3, 1e-4, 0, 1000)
    assert float(sched(0)) == pytest.approx(1e-3)
    with pytest.raises(optim.OptimConfigError, match="warmup_steps"):
        optim.pythia_schedule(1e-3, 1e-4, 2000, 1000)
    with pytest.raises(optim.OptimConfigError, match="decay_steps"):
        optim.pythia_schedule(1e-3, 1e-4, 10, 0)


def _tiny_params():
    """The real GPTNeoX parameter tree (names and shapes), filled with seeded normals."""
    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                      vocab_size=64)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    rng = np.random.RandomState(1)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)
                                              * 0.02), abstract)


def test_weight_decay_mask_is_weights_only():
    params = _tiny_params()
    mask = optim.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed == sorted([
        "['embed_in']['embedding']",
        "['embed_out']['embedding']",
        "['layers']['attention']['query_key_value']['kernel']",
        "['layers']['attention']['dense']['kernel']",
        "['layers']['mlp']['dense_h_to_4h']['kernel']",
        "['layers']['mlp']['dense_4h_to_h']['kernel']",
    ])
    not_decayed = sorted(k for k, m in flat.items() if not m)
    assert len(not_decayed) == 10  # 4 biases + 2 x 2 layer norms + final norm (scale, bias)
    assert all(k.endswith(("['bias']", "['scale']")) for k in not_decayed)


def _optim_cfg(**kw):
    c = ml_collections.ConfigDict(dict(peak_lr=1e-2, min_lr=1e-3, warmup_steps=2,
                                       decay_steps=20, b1=0.9, b2=0.95, eps=1e-8,
                                       weight_decay=0.1, grad_clip=1.0, skip_nonfinite=True))
    c.update(kw)
    return c


def test_matches_torch_adamw_with_param_groups():
    """Same gradients fed to both: our chain (clip 1.0, Adam(0.9, 0.95, 1e-8), decoupled decay
    0.1 on kernels and embeddings, NeoX schedule) vs torch clip_grad_norm_ + AdamW with a decay
    and a no-decay parameter group, the LR set from the schedule every step."""
    torch = pytest.importorskip("torch")
    cfg = _optim_cfg()
    tx, sched = optim.make_optimizer(cfg)
    params = _tiny_params()
    opt_state = tx.init(params)
    mask = optim.weight_decay_mask(params)

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves = jax.tree.leaves(params)
    decay_flags = jax.tree.leaves(mask)
    tparams = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in leaves]
    groups = [{"params": [p for p, d in zip(tparams, decay_flags) if d], "weight_decay": 0.1},
              {"params": [p for p, d in zip(tparams, decay_flags) if not d], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)

    rng = np.random.RandomState(0)
    treedef = jax.tree.structure(params)
    update = jax.jit(tx.update)
    # step 0 uses lr 0 (moments still move); steps 2 and 4 have norms far above 1 (clipped)
    scales = [1.0, 0.05, 30.0, 0.2, 5.0, 1.0]
    for step, scale in enumerate(scales):
        grads_np = [rng.standard_normal(x.shape).astype(np.float32) * 0.01 * scale
                    for x in leaves]
        grads = jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads_np])
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        leaves = jax.tree.leaves(params)

        for p, g in zip(tparams, grads_np):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        for grp in topt.param_groups:
            grp["lr"] = optim.pythia_lr(step, 1e-2, 1e-3, 2, 20)
        topt.step()

        worst = 0.0
        for name, a, b in zip(paths, leaves, tparams):
            b = b.detach().numpy()
            err = float(np.max(np.abs(np.asarray(a) - b))) / max(float(np.max(np.abs(b))), 1e-12)
            worst = max(worst, err)
            assert err <= 1e-5, (step, name, err)
    # the weights moved (and differently for decayed and non-decayed groups)
    assert float(sched(len(scales))) > 0


def test_first_update_is_zero_but_moments_move():
    tx, _ = optim.make_optimizer(_optim_cfg())
    params = {"w": {"kernel": jnp.ones((3,))}}
    st = tx.init(params)
    upd, st = tx.update({"w": {"kernel": jnp.full((3,), 0.5)}}, st, params)
    assert np.all(np.asarray(upd["w"]["kernel"]) == 0.0)
    adam = [s for s in jax.tree_util.tree_leaves(st, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    assert np.all(np.asarray(adam.mu["w"]["kernel"]) != 0.0)
    assert float(optim.current_lr(st, optim.pythia_schedule(1e-2, 1e-3, 2, 20))) == \
        pytest.approx(0.5e-2)


def test_nonfinite_gradients_skip_the_update_and_are_counted():
    tx, sched = optim.make_optimizer(_optim_cfg(warmup_steps=0))
    params = {"w": {"kernel": jnp.ones((4,))}, "b": {"bias": jnp.zeros((4,))}}
    st = tx.init(params)
    good = {"w": {"kernel": jnp.full((4,), 0.1)}, "b": {"bias": jnp.full((4,), 0.1)}}
    bad = {"w": {"kernel": jnp.array([0.1, jnp.nan, 0.1, 0.1])}, "b": {"bias": jnp.full((4,), jnp.inf)}}
    upd, st1 = tx.update(good, st, params)
    p1 = optax.apply_updates(params, upd)
    lr_before = float(optim.current_lr(st1, sched))
    upd, st2 = tx.update(bad, st1, p1)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd))
    counts = optim.nonfinite_counts(st2)
    assert int(counts["total"]) == 1 and int(counts["consecutive"]) == 1
    assert not bool(counts["last_finite"])
    # the inner state (moments, schedule count) is untouched: the LR does not advance
    assert float(optim.current_lr(st2, sched)) == lr_before
    for a, b in zip(jax.tree.leaves(st1.inner_state), jax.tree.leaves(st2.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    upd, st3 = tx.update(good, st2, p1)
    counts = optim.nonfinite_counts(st3)
    assert int(counts["total"]) == 1 and int(counts["consecutive"]) == 0
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(upd))
