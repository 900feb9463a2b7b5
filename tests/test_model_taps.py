"""The layer's capture / intervention seam (`layers.Taps`) against transformers, and the layer's
two layouts (row-major, feature-major) as one computation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pythia_jax  # noqa: E402
from hf_utils import hf_logits, tiny_hf_model  # noqa: E402
from pythia_jax import layers  # noqa: E402
from pythia_jax.layers import FEATURE_MAJOR, ROW, Taps, decoder_layer, rotary_tables  # noqa: E402
from pythia_jax.model import _forward_jit  # noqa: E402

L = 2  # tiny_hf_model's layers


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tiny_hf_model(seed=4, init_scale=0.1)
    d = tmp_path_factory.mktemp("taps") / "hf"
    hf.save_pretrained(d)
    return hf, d


def _ids():
    return np.random.RandomState(3).randint(0, 128, size=(2, 11))


def _hf_hidden_states(hf, ids):
    with torch.no_grad():
        out = hf(torch.as_tensor(ids), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.logits.numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_capture_resid_pre_equals_hf_hidden_states(pair, scan_layers):
    hf, d = pair
    model = pythia_jax.from_pretrained(d, scan_layers=scan_layers)
    ids = _ids()
    hidden, ref_logits = _hf_hidden_states(hf, ids)
    taps = Taps(capture={"hook_resid_pre", "hook_resid_post", "ln_final.hook_normalized"})
    logits, cap = pythia_jax.forward(model, ids, taps=taps)
    assert set(cap) == set(taps.capture)
    pre = np.asarray(cap["hook_resid_pre"])
    assert pre.shape == (L, 2, 11, 64)
    for layer in range(L):  # HF's hidden_states[l] is the input of layer l
        np.testing.assert_allclose(pre[layer], hidden[layer], rtol=1e-4, atol=1e-5)
    # a layer's output is the next one's input; HF's last entry is after the final LayerNorm
    np.testing.assert_array_equal(np.asarray(cap["hook_resid_post"])[0], pre[1])
    np.testing.assert_allclose(np.asarray(cap["ln_final.hook_normalized"]), hidden[L],
                               rtol=1e-4, atol=1e-5)
    # capturing changes nothing
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(pythia_jax.forward(model, ids)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_zero_ablating_a_head_equals_hf_with_that_slice_zeroed(pair, scan_layers):
    """An edit of `attn.hook_z` at one layer (selected by the traced layer index under scan)
    equals transformers with a pre-hook zeroing that head's slice of the output projection."""
    hf, d = pair
    model = pythia_jax.from_pretrained(d, scan_layers=scan_layers)
    ids = _ids()
    layer, head, H = 1, 2, 16

    def zero_head(z_BTNH, at, data):
        keep = jnp.arange(z_BTNH.shape[2]) != head
        return jnp.where((at == layer) & ~keep[None, None, :, None], 0.0, z_BTNH)

    logits, _ = pythia_jax.forward(model, ids, taps=Taps(edits={"attn.hook_z": zero_head}))

    def pre_hook(module, args):
        (x,) = args
        x = x.clone()
        x[..., head * H:(head + 1) * H] = 0.0
        return (x,)

    handle = hf.gpt_neox.layers[layer].attention.dense.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            want = hf(torch.as_tensor(ids)).logits.numpy()
    finally:
        handle.remove()
    _, plain = _hf_hidden_states(hf, ids)
    assert np.abs(want - plain).max() > 1e-2  # the ablation matters
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4)


def test_patching_resid_pre_from_another_run_gives_its_logits(pair):
    """Interventions read traced data: run B with run A's layer-0 input becomes run A; a new
    patch value reuses the compiled program."""
    _, d = pair
    model = pythia_jax.from_pretrained(d, scan_layers=True)
    a, b = _ids(), _ids()[::-1].copy()
    _, cap_a = pythia_jax.forward(model, a, taps=Taps(capture="hook_resid_pre"))

    def patch(x, at, data):
        return jnp.where(at == 0, data[at], x)

    taps = Taps(edits=[("hook_resid_pre", patch)], data=cap_a["hook_resid_pre"])
    got = pythia_jax.forward(model, b, taps=taps)[0]
    want = pythia_jax.forward(model, a)
    assert np.abs(np.asarray(pythia_jax.forward(model, b)) - np.asarray(want)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    n = _forward_jit._cache_size()
    pythia_jax.forward(model, b, taps=Taps(edits=[("hook_resid_pre", patch)],
                                           data=2 * cap_a["hook_resid_pre"]))
    assert _forward_jit._cache_size() == n


def test_pattern_is_hf_attention_and_only_computed_when_tapped(pair):
    hf, d = pair
    model = pythia_jax.from_pretrained(d)
    ids = _ids()
    impl, hf.config._attn_implementation = hf.config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(ids), output_attentions=True)
    finally:
        hf.config._attn_implementation = impl
    taps = Taps(capture={"attn.hook_pattern", "attn.hook_rot_q", "attn.hook_z"})
    logits, cap = pythia_jax.forward(model, ids, taps=taps)
    pattern = np.asarray(cap["attn.hook_pattern"])
    assert pattern.shape == (L, 2, 4, 11, 11)
    for layer in range(L):
        np.testing.assert_allclose(pattern[layer], out.attentions[layer].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)
    # z is the pattern applied to v
    _, cap2 = pythia_jax.forward(model, ids, taps=Taps(capture={"attn.hook_v"}))
    z = np.einsum("lbnts,lbsnh->lbtnh", pattern, np.asarray(cap2["attn.hook_v"]))
    np.testing.assert_allclose(np.asarray(cap["attn.hook_z"]), z, atol=1e-5)

    # without the pattern site the attention kernel runs: it never normalizes the [B, N, T, T]
    # scores (it divides the [B, N, T, H] output), so no probabilities exist in the program
    def normalized_scores(t):
        jaxpr = str(jax.make_jaxpr(lambda i: model(i, taps=t))(jnp.asarray(ids)))
        return len(re.findall(r"f32\[2,4,11,11\] = div", jaxpr))
    assert normalized_scores(Taps(capture={"attn.hook_pattern"})) == 1  # scanned: once
    assert normalized_scores(Taps(capture={"attn.hook_z", "attn.hook_rot_q"})) == 0


def _fwd_kernel_inputs(fn, *args):
    """The operand count of every call of our forward attention kernel in fn's program: 3 with
    rotary outside the kernel, 7 with it fused (+ cos and sin of the q and kv blocks)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and eqn.params["name"] == "pythia_flash_fwd":
                found.append(len(eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_rotary_taps_see_unfused_q_k_where_rotary_is_fused(pair):
    """Our Pallas kernel (interpret mode here) fuses rotary by default; tapping the rotated
    q / k turns that off in the tapped program, so the sites hold rotary applied to the
    captured pre-rotary q / k, and the logits are the fused run's (and transformers')."""
    hf, d = pair
    model = pythia_jax.from_pretrained(d, attention_impl="pallas")
    cfg = model.config
    assert cfg.fused_rotary is None
    ids_np = np.random.RandomState(8).randint(0, 128, size=(1, 128))  # the kernel: T % 128 == 0
    ids = jnp.asarray(ids_np)
    taps = Taps(capture={"attn.hook_q", "attn.hook_k", "attn.hook_rot_q", "attn.hook_rot_k"})
    assert _fwd_kernel_inputs(lambda i: model(i), ids) == [7]
    assert _fwd_kernel_inputs(lambda i: model(i, taps=taps), ids) == [3]
    fused = np.asarray(pythia_jax.forward(model, ids))
    np.testing.assert_allclose(fused, hf_logits(hf, ids_np), atol=1e-4, rtol=1e-4)
    logits, cap = pythia_jax.forward(model, ids, taps=taps)
    np.testing.assert_allclose(np.asarray(logits), fused, atol=1e-5, rtol=1e-5)
    cos, sin = rotary_tables(jnp.arange(128)[None], cfg.rotary_dim, cfg.rotary_emb_base)
    for raw, rot in (("attn.hook_q", "attn.hook_rot_q"), ("attn.hook_k", "attn.hook_rot_k")):
        assert cap[rot].shape == (L, 1, 128, 4, 16)
        want = jax.vmap(lambda x: layers.apply_rotary(x, cos, sin))(cap[raw])
        np.testing.assert_allclose(np.asarray(cap[rot]), np.asarray(want), atol=1e-6)
        assert float(jnp.max(jnp.abs(cap[rot] - cap[raw]))) > 1e-3  # rotated: not the raw one


def test_an_edit_changes_logits_as_computed_by_hand(pair):
    """Adding a direction to the last layer's output at one position: the logits there are the
    final LayerNorm and unembedding of the shifted residual, elsewhere unchanged."""
    _, d = pair
    model = pythia_jax.from_pretrained(d)
    ids = _ids()
    direction = jnp.asarray(np.random.RandomState(5).normal(size=64).astype(np.float32))

    def add(x, at, data):
        return x.at[:, 4].add(jnp.where(at == L - 1, data, 0.0))

    taps = Taps(capture={"hook_resid_post"}, edits={"hook_resid_post": add}, data=direction)
    logits, cap = pythia_jax.forward(model, ids, taps=taps)
    _, plain = pythia_jax.forward(model, ids, taps=Taps(capture={"hook_resid_post"}))
    resid = plain["hook_resid_post"][L - 1]
    np.testing.assert_allclose(np.asarray(cap["hook_resid_post"][L - 1][:, 4]),
                               np.asarray(resid[:, 4] + direction), atol=1e-6)
    lnf = model.final_layer_norm
    want = layers.layer_norm(resid + jnp.zeros_like(resid).at[:, 4].set(direction),
                             lnf.scale[...], lnf.bias[...], model.config.layer_norm_eps)
    want = want @ model.embed_out.embedding[...].T
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4)
    base = np.asarray(pythia_jax.forward(model, ids))
    changed = np.abs(np.asarray(logits) - base).max(-1) > 1e-3
    assert changed[:, 4].all() and not changed[:, :4].any() and not changed[:, 5:].any()


def test_no_taps_is_the_same_program(pair):
    _, d = pair
    model = pythia_jax.from_pretrained(d, scan_layers=True)
    ids = jnp.asarray(_ids())

    def jaxpr(taps):
        return str(jax.make_jaxpr(lambda i: model(i, taps=taps))(ids))

    plain = str(jax.make_jaxpr(lambda i: model(i))(ids))
    assert jaxpr(None) == plain == jaxpr(Taps())
    assert jaxpr(Taps(capture={"hook_mlp_out"})) != plain


def test_sequential_residual_has_resid_mid(tmp_path):
    hf = tiny_hf_model(seed=6, init_scale=0.1, use_parallel_residual=False)
    hf.save_pretrained(tmp_path / "hf")
    model = pythia_jax.from_pretrained(tmp_path / "hf")
    ids = _ids()
    _, cap = pythia_jax.forward(model, ids, taps=Taps(capture={
        "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"}))
    np.testing.assert_allclose(np.asarray(cap["hook_resid_mid"]),
                               np.asarray(cap["hook_resid_pre"] + cap["hook_attn_out"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cap["hook_resid_post"]),
                               np.asarray(cap["hook_resid_mid"] + cap["hook_mlp_out"]), atol=1e-6)


def test_bad_taps_give_clear_errors(pair):
    _, d = pair
    model = pythia_jax.from_pretrained(d)
    with pytest.raises(ValueError, match="taps: unknown site 'blocks.0.hook_resid_pre'"):
        Taps(capture={"blocks.0.hook_resid_pre"})
    with pytest.raises(ValueError, match="taps: unknown site 'attn.hook_attn_scores'"):
        Taps(edits={"attn.hook_attn_scores": lambda v, at, d: v})
    with pytest.raises(TypeError, match="the edit of 'attn.hook_z' must be a function"):
        Taps(edits={"attn.hook_z": 3})
    with pytest.raises(ValueError, match="hook_resid_mid does not exist with the parallel"):
        pythia_jax.forward(model, _ids(), taps=Taps(capture={"hook_resid_mid"}))
    with pytest.raises(TypeError, match="taps: expected a pythia_jax.layers.Taps, got dict"):
        pythia_jax.forward(model, _ids(), taps={"hook_resid_pre": True})


@pytest.mark.parametrize("parallel", [True, False])
def test_feature_major_layout_is_the_same_layer(parallel):
    """One layer, one token per row: the feature-major layout ([D, B], kernels [out, in]) gives
    the row-major result, and the same values at the head sites."""
    cfg = pythia_jax.ModelConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=256,
                                 vocab_size=128, use_parallel_residual=parallel)
    model = pythia_jax.GPTNeoX(cfg)
    rng = np.random.RandomState(7)
    p = {k: jnp.asarray(rng.normal(size=v.shape[1:]).astype(np.float32) * 0.2 + (
         1.0 if k.endswith("ln1_scale") or k.endswith("ln2_scale") else 0.0))
         for k, v in model.layer_params().items()}
    B = 3
    x_B1D = jnp.asarray(rng.normal(size=(B, 1, 64)).astype(np.float32))
    rope = rotary_tables(jnp.asarray([[3], [0], [9]]), cfg.rotary_dim, cfg.rotary_emb_base)

    def attention(q, k, v, state, *, rotary, pattern):  # stand-in: o = v * tanh(q . k)
        assert q.shape == (B, 1, 4, 16) and rotary is None and pattern is None
        return v * jnp.tanh(jnp.sum(q * k, -1, keepdims=True)), state

    taps = Taps(capture={"attn.hook_rot_q", "attn.hook_z", "hook_resid_post"})
    row, _, cap_r = decoder_layer(cfg, ROW.prepare(p), x_B1D, rope, attention, layout=ROW,
                                  taps=taps)
    fm, _, cap_f = decoder_layer(cfg, FEATURE_MAJOR.prepare(p), x_B1D[:, 0].T, rope, attention,
                                 layout=FEATURE_MAJOR, taps=taps)
    assert fm.shape == (64, B)
    # (float32 matmuls in another orientation: equal up to rounding)
    np.testing.assert_allclose(np.asarray(fm.T), np.asarray(row[:, 0]), rtol=1e-5, atol=1e-5)
    for name in ("attn.hook_rot_q", "attn.hook_z"):
        np.testing.assert_allclose(np.asarray(cap_f[name]), np.asarray(cap_r[name]), rtol=1e-5,
                                   atol=1e-5)
    assert np.abs(np.asarray(row - x_B1D)).max() > 1e-2  # the layer did something
