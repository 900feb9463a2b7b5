"""pythia_jax.interp against transformers on tiny random models: every captured site (HF
outputs and forward hooks on HF modules), interventions by construction, the patching grid
against a loop of single patches, attribution patching against finite differences, the logit
and tuned lenses, one compile per structure, the mesh, bad input, scripts/tuned_lens.py and
the examples of docs/research.md."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

import pythia_jax  # noqa: E402
from pythia_jax import interp, layers  # noqa: E402
from pythia_jax.data.indexed import write_indexed_dataset  # noqa: E402
from pythia_jax.research.sweep import CompileCounter  # noqa: E402

L, N, H, D, F = 2, 4, 16, 64, 256  # tiny_hf_model's shape
B, T = 2, 11
RTOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tiny_hf_model(seed=4, init_scale=0.1)
    d = tmp_path_factory.mktemp("interp") / "hf"
    hf.save_pretrained(d)
    return hf, d


@pytest.fixture(scope="module")
def models(pair):
    _, d = pair
    return {scan: pythia_jax.from_pretrained(d, scan_layers=scan) for scan in (False, True)}


def _ids(seed=3):
    return np.random.RandomState(seed).randint(0, 128, size=(B, T))


def _close(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < RTOL, f"{what}: max error {err:.2e} relative to the largest value"


def hf_sites(hf, ids) -> dict:
    """Every site by TransformerLens name from transformers (eager attention):
    hidden_states / attentions where HF returns them, forward hooks on its modules elsewhere."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
    got, hooks = {}, []
    rope = {}

    def keep(name, fn=lambda x: x):
        def hook(module, args, out=None):
            got[name] = fn(args[0] if out is None else out).detach().clone().numpy()
        return hook

    def heads(x):  # [B, T, N * 3H] -> the q, k, v [B, T, N, H] of HF's head-interleaved layout
        return x.view(B, T, N, 3, H)

    hooks.append(hf.gpt_neox.rotary_emb.register_forward_hook(
        lambda m, a, out: rope.update(cos=out[0], sin=out[1])))
    for l, layer in enumerate(hf.gpt_neox.layers):
        at = layer.attention
        hooks.append(at.query_key_value.register_forward_hook(keep(f"qkv{l}", heads)))
        hooks.append(at.dense.register_forward_pre_hook(
            keep(f"blocks.{l}.attn.hook_z", lambda x: x.view(B, T, N, H))))
        hooks.append(at.dense.register_forward_hook(keep(f"blocks.{l}.hook_attn_out")))
        hooks.append(layer.mlp.dense_h_to_4h.register_forward_hook(
            keep(f"blocks.{l}.mlp.hook_pre")))
        hooks.append(layer.mlp.dense_4h_to_h.register_forward_pre_hook(
            keep(f"blocks.{l}.mlp.hook_post")))
        hooks.append(layer.mlp.register_forward_hook(keep(f"blocks.{l}.hook_mlp_out")))
        hooks.append(layer.register_forward_hook(keep(f"blocks.{l}.hook_resid_post",
                                                      lambda o: o[0] if isinstance(o, tuple)
                                                      else o)))
    impl, hf.config._attn_implementation = hf.config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(ids), output_hidden_states=True, output_attentions=True)
            for l in range(L):
                qkv = torch.as_tensor(got.pop(f"qkv{l}"))
                q, k, v = (qkv[..., i, :] for i in range(3))
                for name, x in (("q", q), ("k", k), ("v", v)):
                    got[f"blocks.{l}.attn.hook_{name}"] = x.numpy()
                # HF's own rotary function on HF's q / k ([B, N, T, H] there)
                rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), rope["cos"],
                                              rope["sin"])
                got[f"blocks.{l}.attn.hook_rot_q"] = rq.transpose(1, 2).numpy()
                got[f"blocks.{l}.attn.hook_rot_k"] = rk.transpose(1, 2).numpy()
    finally:
        hf.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    for l in range(L):
        got[f"blocks.{l}.hook_resid_pre"] = out.hidden_states[l].numpy()
        got[f"blocks.{l}.attn.hook_pattern"] = out.attentions[l].numpy()
    got["ln_final.hook_normalized"] = out.hidden_states[L].numpy()
    return got, out.logits.numpy()


@pytest.fixture(scope="module")
def reference(pair):
    return hf_sites(pair[0], _ids())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_site_equals_transformers(models, reference, scan_layers):
    want, want_logits = reference
    logits, cache = interp.run_with_cache(models[scan_layers], _ids())
    names = interp.site_names(models[scan_layers].config)
    assert set(cache) == set(names) == set(want)
    assert len(names) == L * 13 + 1  # no hook_resid_mid in the parallel block
    for name in names:
        _close(cache[name], want[name], name)
    _close(logits, want_logits, "logits")
    # a capture at one layer is the full capture's (up to float rounding: another program)
    _, one = interp.run_with_cache(models[scan_layers], _ids(), ["blocks.1.attn.hook_pattern"])
    assert list(one) == ["blocks.1.attn.hook_pattern"]
    np.testing.assert_allclose(np.asarray(one["blocks.1.attn.hook_pattern"]),
                               np.asarray(cache["blocks.1.attn.hook_pattern"]), atol=1e-6)


def test_pattern_only_at_the_layers_asked(models):
    """Unrolled layers: asking the pattern of layer 1 computes one softmax of the scores, not
    one per layer (layer 0 runs the fused attention step); asking both computes two."""
    model = models[False]
    ids = jnp.asarray(_ids())

    def normalized_scores(names):
        sites = interp._capture_sites(model.config, names)
        jaxpr = str(jax.make_jaxpr(lambda i: model(i, taps=interp._taps_for(sites)))(ids))
        return len(re.findall(rf"f32\[{B},{N},{T},{T}\] = div", jaxpr))

    assert normalized_scores(["blocks.1.attn.hook_pattern"]) == 1
    assert normalized_scores(["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]) == 2
    assert normalized_scores(["blocks.1.attn.hook_z"]) == 0


def test_names_as_predicate_and_reducers_on_device(models, reference):
    want, _ = reference
    model = models[True]
    rng = np.random.RandomState(0)
    dirs = rng.normal(size=(3, D)).astype(np.float32)
    _, cache = interp.run_with_cache(
        model, _ids(), lambda n: n.endswith("hook_resid_post") or n.endswith("hook_pattern"),
        reducers={"hook_resid_post": [interp.Positions(-1), interp.Project(dirs)],
                  "blocks.0.attn.hook_pattern": interp.BatchMean(),
                  "blocks.1.attn.hook_pattern": interp.Positions([2, 5])})
    assert sorted(cache) == ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post",
                             "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]
    for l in range(L):
        got = cache[f"blocks.{l}.hook_resid_post"]
        assert isinstance(got, jax.Array) and got.shape == (B, 3)
        _close(got, want[f"blocks.{l}.hook_resid_post"][:, -1] @ dirs.T, "projection")
    _close(cache["blocks.0.attn.hook_pattern"], want["blocks.0.attn.hook_pattern"].mean(0),
           "batch mean")
    _close(cache["blocks.1.attn.hook_pattern"], want["blocks.1.attn.hook_pattern"][:, :, [2, 5]],
           "query positions")


def test_one_compile_per_names_and_shape(models):
    model = models[True]
    names = ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    interp.run_with_cache(model, _ids(1), names)
    c0 = CompileCounter.total()
    _, a = interp.run_with_cache(model, _ids(2), names)
    _, b = interp.run_with_cache(model, _ids(2), list(reversed(names)))
    assert CompileCounter.total() == c0  # new ids, same names (any order): no compile
    np.testing.assert_array_equal(np.asarray(a[names[1]]), np.asarray(b[names[1]]))
    interp.run_with_cache(model, _ids(2), names[:1])
    assert CompileCounter.total() > c0  # other names: another program
    # interventions: new values and masks of the same shapes reuse the program
    def ivs(scale):
        return [interp.Intervention("blocks.1.attn.hook_z", "scale", value=scale,
                                    mask=np.eye(B, T, dtype=bool))]
    interp.run_with_interventions(model, _ids(), ivs(0.5))
    c1 = CompileCounter.total()
    out = interp.run_with_interventions(model, _ids(), ivs(2.0))
    assert CompileCounter.total() == c1
    assert np.abs(np.asarray(out) - np.asarray(pythia_jax.forward(model, _ids()))).max() > 1e-3


def test_patching_resid_pre_from_run_a_gives_run_a(models):
    model = models[True]
    a, b = _ids(), _ids(9)
    logits_a, cache_a = interp.run_with_cache(model, a, ["blocks.0.hook_resid_pre"])
    plain_b = interp.run_with_cache(model, b, ["blocks.0.hook_resid_pre"])[0]
    assert np.abs(np.asarray(plain_b) - np.asarray(logits_a)).max() > 1e-2
    got = interp.run_with_interventions(model, b, [interp.Intervention(
        "blocks.0.hook_resid_pre", "patch", value=cache_a["blocks.0.hook_resid_pre"])])
    _close(got, logits_a, "patched logits")
    # a masked patch (batch row 0 only) changes only row 0
    got = interp.run_with_interventions(model, b, [interp.Intervention(
        "blocks.0.hook_resid_pre", "patch", value=cache_a["blocks.0.hook_resid_pre"],
        mask=np.array([True, False]))])
    _close(got[0], logits_a[0], "row 0")
    _close(got[1], plain_b[1], "row 1")


def _hf_logits_with(hf, ids, module, hook, pre):
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook)
    try:
        with torch.no_grad():
            return hf(torch.as_tensor(ids)).logits.numpy()
    finally:
        handle.remove()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_zero_ablating_a_head_equals_hf(pair, models, scan_layers):
    hf, _ = pair
    layer, head = 1, 2

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * H:(head + 1) * H] = 0.0
        return (x,)

    want = _hf_logits_with(hf, _ids(), hf.gpt_neox.layers[layer].attention.dense, zero_head,
                           pre=True)
    mask = np.arange(N) == head
    logits, cache = interp.run_with_interventions(
        models[scan_layers], _ids(),
        [interp.Intervention(f"blocks.{layer}.attn.hook_z", "zero", mask=mask[None, None])],
        return_cache=[f"blocks.{layer}.attn.hook_z"])
    _close(logits, want, "ablated logits")
    z = np.asarray(cache[f"blocks.{layer}.attn.hook_z"])
    assert (z[:, :, head] == 0).all() and np.abs(z[:, :, head - 1]).max() > 1e-3

    # two heads at two layers of one site (one scanned segment: each edit keeps to its layer)
    def zero_head0(module, args):
        x = args[0].clone()
        x[..., 0:H] = 0.0
        return (x,)

    handle = hf.gpt_neox.layers[0].attention.dense.register_forward_pre_hook(zero_head0)
    try:
        want2 = _hf_logits_with(hf, _ids(), hf.gpt_neox.layers[layer].attention.dense,
                                zero_head, pre=True)
    finally:
        handle.remove()
    got2 = interp.run_with_interventions(models[scan_layers], _ids(), [
        interp.Intervention("blocks.0.attn.hook_z", "zero", mask=(np.arange(N) == 0)[None, None]),
        interp.Intervention(f"blocks.{layer}.attn.hook_z", "zero", mask=mask[None, None])])
    assert np.abs(want2 - want).max() > 1e-3
    _close(got2, want2, "two ablations")


def test_adding_a_direction_at_resid_post_equals_hf(pair, models):
    hf, _ = pair
    rng = np.random.RandomState(5)
    direction = rng.normal(size=D).astype(np.float32)
    pos = np.zeros((B, T), bool)
    pos[:, 4] = True

    def add(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        x = x.clone()
        x[:, 4] += torch.as_tensor(direction)
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    want = _hf_logits_with(hf, _ids(), hf.gpt_neox.layers[0], add, pre=False)
    got = interp.run_with_interventions(models[True], _ids(), [interp.Intervention(
        "blocks.0.hook_resid_post", "add", value=direction, mask=pos)])
    _close(got, want, "steered logits")
    plain = np.asarray(pythia_jax.forward(models[True], _ids()))
    changed = np.abs(np.asarray(got) - plain).max(-1) > 1e-4
    assert changed[:, 4:].any() and not changed[:, :4].any()  # causal: nothing before 4 moves


def test_set_scale_mean_ops_by_hand(models):
    model = models[True]
    name = "blocks.1.mlp.hook_post"
    _, base = interp.run_with_cache(model, _ids(), [name])
    x = np.asarray(base[name])
    for iv, want in (
            (interp.Intervention(name, "set", value=np.float32(0.25)), np.full_like(x, 0.25)),
            (interp.Intervention(name, "scale", value=3.0, mask=[[False], [True]]),
             x * np.array([1.0, 3.0])[:, None, None]),
            (interp.Intervention(name, "mean"), np.broadcast_to(x.mean(0), x.shape))):
        _, cache = interp.run_with_interventions(model, _ids(), [iv], return_cache=[name])
        _close(cache[name], want, iv.op)


def test_patch_grid_equals_the_loop_of_single_patches(models):
    model = models[True]
    clean, corrupt = _ids(), _ids(9)
    tok = int(clean[0, -1])

    def metric(logits):
        return jnp.mean(logits[:, -1, tok] - logits[:, -1, 0])

    positions = [3, T - 1]
    grid = interp.patch_grid(model, clean, corrupt, "attn.hook_z", metric=metric,
                             positions=positions, batch_size=3)
    assert grid.shape == (L, 2, N)
    _, clean_cache = interp.run_with_cache(model, clean, lambda n: n.endswith("attn.hook_z"))
    loop = np.zeros((L, 2, N))
    for l in range(L):
        for i, t in enumerate(positions):
            for n in range(N):
                mask = np.zeros((1, T, N), bool)
                mask[0, t, n] = True
                name = f"blocks.{l}.attn.hook_z"
                logits = interp.run_with_interventions(model, corrupt, [interp.Intervention(
                    name, "patch", value=clean_cache[name], mask=mask)])
                loop[l, i, n] = float(metric(logits))
    _close(grid, loop, "grid")
    assert np.ptp(loop) > 1e-3  # the grid is not constant
    # residual sites: [layers, positions]; patching the last position of the last layer's
    # output gives the clean metric exactly
    g2 = interp.patch_grid(model, clean, corrupt, "hook_resid_post", metric=metric,
                           layers=[L - 1], positions=[T - 1])
    assert g2.shape == (1, 1)
    _close(g2[0, 0], metric(pythia_jax.forward(model, clean)), "resid_post patch")


def test_attribution_patching_is_the_linearisation(models):
    """Against central finite differences of the patch direction at every grid point."""
    model = models[True]
    clean, corrupt = _ids(), _ids(9)

    def metric(logits):
        return jnp.mean(jax.nn.log_softmax(logits[:, -1])[:, 7])

    attr = np.asarray(interp.attribution_patching(model, clean, corrupt, "attn.hook_z",
                                                  metric=metric))
    assert attr.shape == (L, T, N)
    _, cc = interp.run_with_cache(model, clean, lambda n: n.endswith("attn.hook_z"))
    _, kc = interp.run_with_cache(model, corrupt, lambda n: n.endswith("attn.hook_z"))
    eps = 1e-2
    for l, t, n in [(0, 2, 1), (1, T - 1, 3), (0, T - 1, 0)]:
        name = f"blocks.{l}.attn.hook_z"
        mask = np.zeros((1, T, N), bool)
        mask[0, t, n] = True
        delta = np.asarray(cc[name]) - np.asarray(kc[name])

        def at(s):
            return float(metric(interp.run_with_interventions(model, corrupt, [
                interp.Intervention(name, "add", value=s * delta, mask=mask)])))
        fd = (at(eps) - at(-eps)) / (2 * eps)
        assert abs(attr[l, t, n] - fd) < 2e-3 * max(1.0, abs(fd)), (l, t, n, attr[l, t, n], fd)
    # the last layer's z at an earlier position reaches only that position's logits, and the
    # metric reads the last position: zero attribution there
    np.testing.assert_allclose(attr[L - 1, :T - 1], 0.0, atol=1e-7)
    assert np.abs(attr[L - 1, T - 1]).max() > 1e-5


def test_logit_lens_last_layer_is_the_model(models):
    model = models[True]
    ids = _ids()
    targets = np.roll(ids, -1, axis=1)
    res = interp.logit_lens(model, ids, top_k=5, targets=targets)
    assert res.layers == tuple(range(L))
    assert res.top_ids.shape == (L, B, T, 5) and res.target_logprobs.shape == (L, B, T)
    logp = jax.nn.log_softmax(pythia_jax.forward(model, ids), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, 5)
    np.testing.assert_array_equal(np.asarray(res.top_ids[L - 1]), np.asarray(top_ids))
    _close(res.top_logprobs[L - 1], top_lp, "top-k log-probs")
    _close(res.target_logprobs[L - 1],
           np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0], "targets")
    # layer 0 is the final LN + unembedding of the first layer's output
    _, cache = interp.run_with_cache(model, ids, ["blocks.0.hook_resid_post"])
    lnf = model.final_layer_norm
    h = layers.layer_norm(cache["blocks.0.hook_resid_post"], lnf.scale[...], lnf.bias[...],
                          model.config.layer_norm_eps)
    lp0 = jax.nn.log_softmax(h @ model.embed_out.embedding[...].T, axis=-1)
    _close(res.target_logprobs[0], np.take_along_axis(np.asarray(lp0), targets[..., None],
                                                      -1)[..., 0], "layer 0")
    only = interp.logit_lens(model, ids, layers=[-1], top_k=0, targets=targets)
    assert only.top_ids is None and only.layers == (L - 1,)
    _close(only.target_logprobs[0], res.target_logprobs[L - 1], "layers=[-1]")


def _token_rows(seed, n, seq):
    return np.random.RandomState(seed).randint(0, 128, size=(n, seq)).astype(np.int32)


def test_tuned_lens_training_reduces_held_out_kl_and_round_trips(models, tmp_path):
    model = models[True]
    train, held = _token_rows(0, 32, 16), _token_rows(1, 8, 16)
    identity = interp.TunedLens.identity(model)
    before = identity.kl(model, held)
    # the identity lens is the logit lens
    a = identity(model, held, top_k=3)
    b = interp.logit_lens(model, held, top_k=3)
    np.testing.assert_array_equal(np.asarray(a.top_ids), np.asarray(b.top_ids))
    assert before[L - 1] < 1e-6 < before[0]  # the last layer's lens is the model already
    lens, losses = interp.train_tuned_lens(
        model, (train[(8 * s + np.arange(8)) % 32] for s in range(40)), steps=40, lr=3e-3)
    after = lens.kl(model, held)
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert after[0] < 0.8 * before[0], (before, after)
    lens.save(tmp_path / "lens")
    back = interp.TunedLens.load(tmp_path / "lens")
    np.testing.assert_array_equal(np.asarray(back.weight), np.asarray(lens.weight))
    np.testing.assert_array_equal(np.asarray(back.bias), np.asarray(lens.bias))
    np.testing.assert_array_equal(back.kl(model, held), after)
    assert back.info["steps"] == 40
    with pytest.raises(FileExistsError):
        lens.save(tmp_path / "lens")


def test_bad_input_is_refused_clearly(models, tmp_path):
    model = models[True]
    ids = _ids()
    with pytest.raises(ValueError, match=r"unknown site name 'blocks.0.hook_resid_pr'; close "
                                         r"matches: blocks.0.hook_resid_pre"):
        interp.run_with_cache(model, ids, ["blocks.0.hook_resid_pr"])
    with pytest.raises(ValueError, match=r"'blocks.0.attn.hook_zz'; close matches: "
                                         r"blocks.0.attn.hook_z"):
        interp.run_with_interventions(model, ids, [interp.Intervention("blocks.0.attn.hook_zz",
                                                                       "zero")])
    with pytest.raises(ValueError, match=r"blocks.5.hook_resid_pre: layer 5 is out of range: "
                                         r"the model has 2 layers \(0..1\)"):
        interp.run_with_cache(model, ids, ["blocks.5.hook_resid_pre"])
    with pytest.raises(ValueError, match="hook_resid_mid does not exist"):
        interp.run_with_cache(model, ids, ["blocks.0.hook_resid_mid"])
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not broadcast over the "
                                         r"site's leading axes \(2, 11, 4, 16\)"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.attn.hook_z", "zero", mask=np.ones(3, bool))])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 11, 4, 16, 1\)"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.attn.hook_z", "zero", mask=np.ones((2, 11, 4, 16, 1), bool))])
    with pytest.raises(ValueError, match="unknown op 'ablate'"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.attn.hook_z", "ablate")])
    with pytest.raises(ValueError, match=r"a patch value must have the site's shape "
                                         r"\(2, 11, 64\), got \(64,\)"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.hook_resid_pre", "patch", value=np.zeros(64, np.float32))])
    with pytest.raises(ValueError, match="op 'add' needs a value"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.hook_resid_pre", "add")])
    with pytest.raises(ValueError, match=r"value of shape \(63,\) does not broadcast"):
        interp.run_with_interventions(model, ids, [interp.Intervention(
            "blocks.0.hook_resid_pre", "add", value=np.zeros(63, np.float32))])
    with pytest.raises(ValueError, match="reducers: 'blocks.1.hook_resid_pre' is not among"):
        interp.run_with_cache(model, ids, ["blocks.0.hook_resid_pre"],
                              reducers={"blocks.1.hook_resid_pre": interp.BatchMean()})
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        interp.logit_lens(model, ids, layers=[2])
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        interp.patch_grid(model, ids, ids, "attn.hook_z", metric=jnp.sum, layers=[3])
    with pytest.raises(ValueError, match=r"batch_size \(grid points per step\) must be"):
        interp.patch_grid(model, ids, ids, "attn.hook_z", metric=jnp.sum, batch_size=0)
    with pytest.raises(ValueError, match="cannot be patched over a grid"):
        interp.patch_grid(model, ids, ids, "attn.hook_pattern", metric=jnp.sum)
    with pytest.raises(ValueError, match="must have the same shape"):
        interp.attribution_patching(model, ids, ids[:, :5], metric=jnp.sum)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        interp.run_with_cache(model, ids + 1000)
    with pytest.raises(ValueError, match="taps: layer 2 is out of range"):
        pythia_jax.forward(model, ids, taps=layers.Taps(layers={"attn.hook_z": [2]}))
    (tmp_path / "lens").mkdir()
    with pytest.raises(FileNotFoundError, match="tuned_lens.json: no such file"):
        interp.TunedLens.load(tmp_path / "lens")
    interp.TunedLens.identity(model).save(tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / "tuned_lens.json").read_text())
    (tmp_path / "ok" / "tuned_lens.json").write_text(json.dumps(dict(meta, format="other")))
    with pytest.raises(ValueError, match=r"tuned_lens.json: field 'format': expected "
                                         r"'pythia-jax-tuned-lens', got 'other'"):
        interp.TunedLens.load(tmp_path / "ok")
    wrong = interp.TunedLens(np.zeros((L, 8, 8), np.float32), np.zeros((L, 8), np.float32))
    with pytest.raises(ValueError, match=r"the model needs \(2, 64, 64\)"):
        wrong.kl(model, ids)


# ------------------------------------------------------------------------------------------------
# 8 fake devices
def _mesh_worker(hf_dir: str, out: str) -> None:
    from pythia_jax.sharding import logical_rules, logical_to_spec, make_mesh
    assert jax.device_count() == 8
    mesh = make_mesh({"data": 2, "tensor": 4})
    res, specs = {}, {}
    for scan in (False, True):
        model = pythia_jax.from_pretrained(hf_dir, scan_layers=scan, mesh=mesh)
        with logical_rules(mesh):
            logits, cache = interp.run_with_cache(model, _ids())
            ablated = interp.run_with_interventions(model, _ids(), [interp.Intervention(
                "blocks.1.attn.hook_z", "zero", mask=(np.arange(N) == 2)[None, None])])
        for name, v in cache.items():
            res[f"{scan}/{name}"] = np.asarray(v)
            axes = interp.SITE_AXES[interp.parse_name(name, model.config)[0]]
            want = logical_to_spec(axes, shape=v.shape, mesh=mesh)
            specs[f"{scan}/{name}"] = [str(v.sharding.spec), str(want),
                                       v.sharding.is_equivalent_to(
                                           jax.sharding.NamedSharding(mesh, want), v.ndim)]
        res[f"{scan}/logits"] = np.asarray(logits)
        res[f"{scan}/ablated"] = np.asarray(ablated)
    np.savez(os.path.join(out, "mesh.npz"), **res)
    with open(os.path.join(out, "specs.json"), "w") as f:
        json.dump(specs, f)


def test_captures_on_8_devices_keep_the_activation_sharding(pair, models, reference, tmp_path):
    _, d = pair
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "mesh_worker", str(d), str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, want_logits = reference
    got = np.load(tmp_path / "mesh.npz")
    specs = json.loads((tmp_path / "specs.json").read_text())
    for scan in (False, True):
        for name, w in want.items():
            _close(got[f"{scan}/{name}"], w, f"8 devices, scan={scan}: {name}")
        _close(got[f"{scan}/logits"], want_logits, "logits")
    ablated = interp.run_with_interventions(models[True], _ids(), [interp.Intervention(
        "blocks.1.attn.hook_z", "zero", mask=(np.arange(N) == 2)[None, None])])
    assert np.abs(np.asarray(ablated) - want_logits).max() > 1e-2
    for scan in (False, True):
        _close(got[f"{scan}/ablated"], ablated, f"8 devices, scan={scan}: ablated")
    for key, (spec, expected, same) in specs.items():
        assert same, f"{key}: sharding {spec}, expected {expected}"
    # the batch is split over `data`, the heads over `tensor`
    assert re.fullmatch(r"\w*\('data', None, 'tensor'(, None)?\)",
                        specs["True/blocks.0.attn.hook_z"][0]), specs["True/blocks.0.attn.hook_z"]


# ------------------------------------------------------------------------------------------------
# scripts/tuned_lens.py
def _script():
    spec = importlib.util.spec_from_file_location("_tuned_lens_script",
                                                  REPO / "scripts" / "tuned_lens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tuned_lens_script(pair, tmp_path, capsys):
    _, d = pair
    prefix = tmp_path / "rows"
    write_indexed_dataset(prefix, list(_token_rows(2, 24, 20)), vocab_size=128)
    script = _script()
    out = tmp_path / "lens"
    base = ["tuned_lens.py", f"--model={d}", f"--data={prefix}", "--seq_len=16",
            "--batch_size=4", "--eval_rows=4"]
    assert script.main(base + ["--steps=12", f"--out={out}", "--lr=3e-3"]) == 0
    text = capsys.readouterr().out
    lens = interp.TunedLens.load(out)
    info = lens.info
    assert info["steps"] == 12 and len(info["held_out_kl_after"]) == L
    assert info["held_out_kl_after"][0] < info["held_out_kl_before"][0]
    assert "layer 0: held-out KL" in text
    # bad input: clear errors, exit 2, nothing written
    for extra, msg in (
            (["--steps=0", f"--out={tmp_path}/a"], "--steps must be >= 1"),
            (["--steps=2", f"--out={out}"], "already exists"),
            (["--steps=2", f"--out={tmp_path}/nodir/x"], "no such directory"),
            (["--steps=2", f"--out={tmp_path}/b", "--batch_size=30"], "need at least"),
            (["--steps=2", f"--out={tmp_path}/c", "--seq_len=50"], "fewer than seq_len=50"),
            (["--steps=2", f"--out={tmp_path}/d", f"--data={tmp_path}/missing"],
             "no such file")):
        args = [a for a in base if not any(a.startswith(e.split("=")[0] + "=") for e in extra)]
        assert script.main(args + extra) == 2
        assert msg in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens", "rows.bin", "rows.idx"]


# ------------------------------------------------------------------------------------------------
# docs/research.md
def _doc_block(title: str) -> str:
    text = (REPO / "docs" / "research.md").read_text()
    section = text[text.index(f"## {title}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_examples_run(pair, tmp_path, monkeypatch):
    """The two worked examples of docs/research.md, with the hub swapped for tiny local
    checkpoints (one directory per revision)."""
    dirs = {}
    for i, rev in enumerate(("step1000", "step143000")):
        dirs[rev] = tmp_path / rev
        tiny_hf_model(seed=10 + i, init_scale=0.1).save_pretrained(dirs[rev])
    real = pythia_jax.from_pretrained

    def local(src, revision=None, **kw):
        assert src == "EleutherAI/pythia-160m"
        return real(dirs[revision or "step143000"], **kw)

    monkeypatch.setattr(pythia_jax, "from_pretrained", local)
    clean, corrupt = _ids(), _ids(9)
    ns = {"clean_ids": clean, "corrupt_ids": corrupt, "ids": clean}
    exec(_doc_block("Logit lens across checkpoints"), ns)
    assert set(ns["curves"]) == {"step1000", "step143000"}
    for rev, curve in ns["curves"].items():
        assert curve.shape == (L,)
        model = real(dirs[rev])
        logp = jax.nn.log_softmax(pythia_jax.forward(model, clean), -1)
        _close(curve[-1], np.mean(np.take_along_axis(
            np.asarray(logp)[:, :-1], clean[:, 1:, None], -1)), rev)
    exec(_doc_block("Activation patching of a head"), ns)
    assert ns["effects"].shape == (L, T, N)
    best = ns["best"]
    assert ns["effects"][best] == ns["effects"].max()


if __name__ == "__main__":
    if sys.argv[1] == "mesh_worker":
        _mesh_worker(sys.argv[2], sys.argv[3])
