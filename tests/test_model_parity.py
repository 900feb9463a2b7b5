"""Numerical parity with `transformers.GPTNeoXForCausalLM` on tiny random models (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pythia_jax
from hf_utils import hf_logits, tiny_hf_model
from pythia_jax.hf import hf_state_dict

LAYOUTS = {
    "pythia": dict(),
    "sequential_residual": dict(use_parallel_residual=False),
    "full_rotary": dict(rotary_pct=1.0),
    "head_dim_40": dict(hidden_size=80, num_attention_heads=2, intermediate_size=320),
    "tanh_gelu": dict(hidden_act="gelu_new"),
}


def _load(tmp_path, hf_model, **kw):
    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    return pythia_jax.from_pretrained(d, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(tmp_path, layout):
    hf = tiny_hf_model(seed=1, init_scale=0.1, **LAYOUTS[layout])
    model = _load(tmp_path, hf)
    ids = np.random.RandomState(0).randint(0, 128, size=(3, 33))  # batch > 1, odd length
    ref = hf_logits(hf, ids)
    ours = np.asarray(model(ids))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    # the check is sensitive: a perturbed rotary base must break it
    # (a numerics field, not a from_pretrained override: through the HF format's loader)
    off = None
    if layout == "pythia":
        hf.save_pretrained(tmp_path / "x")
        off = pythia_jax.hf.load_hf(tmp_path / "x", rotary_emb_base=5000.0)
    if off is not None:
        assert np.abs(np.asarray(off(ids)) - ref).max() > 1e-3


def _jax_loss(model, ids):
    logits = model(ids)[:, :-1]
    labels = ids[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


@pytest.mark.parametrize("layout", ["pythia", "sequential_residual"])
def test_loss_gradients_match_torch(tmp_path, layout):
    import torch
    hf = tiny_hf_model(seed=2, init_scale=0.1, **LAYOUTS[layout])
    model = _load(tmp_path, hf)
    ids = np.random.RandomState(1).randint(0, 128, size=(2, 24))
    out = hf(torch.as_tensor(ids), labels=torch.as_tensor(ids))
    out.loss.backward()
    # transformers >= 5 names the output head `lm_head`; HF checkpoints call it `embed_out`
    torch_grads = {k.replace("lm_head.", "embed_out."): p.grad.numpy()
                   for k, p in hf.named_parameters()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        return _jax_loss(nnx.merge(graphdef, params, rest), jnp.asarray(ids))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(loss) - out.loss.item()) < 1e-5
    grad_model = nnx.merge(graphdef, grads, rest)
    n = 0
    for name, shape, _, thunk in hf_state_dict(grad_model):
        g_ref = torch_grads[name]
        g = thunk()
        assert g.shape == g_ref.shape, name
        rel = np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-12)
        assert rel <= 1e-4, (name, rel)
        n += 1
    assert n == len(torch_grads) == 4 + 12 * 2


def test_bf16_compute_close_to_fp32_hf(tmp_path):
    hf = tiny_hf_model(seed=3, init_scale=0.08, vocab_size=512, hidden_size=128,
                       num_attention_heads=4, intermediate_size=512, num_hidden_layers=3)
    model = _load(tmp_path / "b", hf)
    bf16 = pythia_jax.from_pretrained(tmp_path / "b" / "hf", compute_dtype="bfloat16")
    assert bf16.config.param_dtype == "float32" and bf16.config.dtype == "bfloat16"
    ids = np.random.RandomState(2).randint(0, 512, size=(4, 64))
    ref = hf_logits(hf, ids)
    ours = np.asarray(bf16(ids))
    p_ref = jax.nn.log_softmax(ref, -1)
    p_ours = jax.nn.log_softmax(ours, -1)
    kl = np.asarray(jnp.sum(jnp.exp(p_ref) * (p_ref - p_ours), -1)).mean()
    assert kl <= 0.015, kl
    top2 = np.sort(ref, -1)[..., -2:]
    confident = (top2[..., 1] - top2[..., 0]) > 0.1
    assert confident.sum() > 0.5 * confident.size  # the test has teeth
    agree = (ours.argmax(-1) == ref.argmax(-1))[confident].mean()
    assert agree >= 0.99, agree
    # fp32 compute is far closer than bf16: the bf16 path really ran in bf16
    fp32_err = np.abs(np.asarray(model(ids)) - ref).max()
    assert fp32_err < 1e-4 < np.abs(ours - ref).max()


def test_forward_is_compiled_model_call_and_reused_across_models(tmp_path):
    """`pythia_jax.forward` = `model(ids)` (and matches transformers), one compile per shape,
    shared by models of the same config without caching their weights."""
    from pythia_jax.model import _forward_jit

    hf = tiny_hf_model(seed=1, init_scale=0.1)
    model = _load(tmp_path, hf)
    ids = np.random.RandomState(0).randint(0, 128, size=(2, 17))
    ref = hf_logits(hf, ids)
    before = _forward_jit._cache_size()
    got = np.asarray(pythia_jax.forward(model, ids))
    assert np.abs(got - ref).max() <= 1e-4
    np.testing.assert_allclose(got, np.asarray(model(ids)), atol=1e-6, rtol=0)
    hidden = pythia_jax.forward(model, ids, return_hidden=True)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(model(ids, return_hidden=True)),
                               atol=1e-6, rtol=0)
    assert _forward_jit._cache_size() == before + 2  # logits and hidden: one compile each
    # another model with the same config: same compiled function, its own weights
    other = _load(tmp_path / "other", tiny_hf_model(seed=2, init_scale=0.1))
    got2 = np.asarray(pythia_jax.forward(other, jnp.asarray(ids)))
    assert _forward_jit._cache_size() == before + 2
    np.testing.assert_allclose(got2, np.asarray(other(ids)), atol=1e-6, rtol=0)
    assert np.abs(got2 - got).max() > 1e-3
    # explicit positions are passed through (a shifted window gives other logits)
    pos = np.broadcast_to(np.arange(5, 22), (2, 17))
    np.testing.assert_allclose(np.asarray(pythia_jax.forward(model, ids, positions_BT=pos)),
                               np.asarray(model(ids, positions_BT=pos)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ids, match", [
    (np.arange(5), r"input_ids: expected shape \[batch, length\], got \(5,\)"),
    (np.zeros((1, 3), np.float32), "input_ids: expected integer token ids, got dtype float32"),
    (np.array([[1, 2, 128]]), r"input_ids: token id 128 is outside the vocabulary \[0, 128\)"),
    (np.array([[-1, 2]]), r"input_ids: token id -1 is outside the vocabulary \[0, 128\)"),
])
def test_forward_rejects_bad_input(tmp_path, ids, match):
    model = _load(tmp_path, tiny_hf_model(seed=1))
    with pytest.raises(ValueError, match=match):
        pythia_jax.forward(model, ids)


def test_forward_rejects_a_non_model():
    with pytest.raises(TypeError, match="model: expected a pythia_jax GPTNeoX, got dict"):
        pythia_jax.forward({}, np.zeros((1, 2), np.int32))
