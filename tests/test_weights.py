"""pythia_jax.weights: every record's HF <-> ours re-orientation (both ways, bit-exact), the fast
loader's direct copy against it, and the records against the model's parameter tree."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pythia_jax import weights
from pythia_jax.config import ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model

# d=24, N=3 heads of H=8, F=40, V=37: row counts that are not multiples of the copy block
CFG = ModelConfig(hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40,
                  vocab_size=37)


def _param_shapes(cfg):
    return {tuple(str(p) for p in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))}


def _ours_shape(rec, shapes):
    full = shapes[rec.path]
    return full[1:] if rec.layered else full


def test_records_cover_every_parameter_with_its_shape():
    shapes = _param_shapes(CFG)
    assert {r.path for r in weights.RECORDS} == set(shapes)
    assert len({r.hf_name for r in weights.RECORDS}) == len(weights.RECORDS)
    names = weights.hf_names(CFG)
    assert len(names) == len(set(names)) == 4 + 12 * CFG.num_layers
    assert names[0] == "gpt_neox.embed_in.weight" and names[-1] == "embed_out.weight"
    for rec in weights.RECORDS:
        a = np.zeros(rec.hf_shape(CFG), np.float32)
        view = rec.to_ours(a, CFG)
        assert view.shape == _ours_shape(rec, shapes), rec.hf_name
        assert np.shares_memory(view, a), f"{rec.hf_name}: to_ours must be a view"


def test_to_hf_inverts_to_ours_for_every_record():
    rng = np.random.default_rng(1)
    shapes = _param_shapes(CFG)
    for rec in weights.RECORDS:
        a = rng.standard_normal(rec.hf_shape(CFG)).astype(np.float32)
        np.testing.assert_array_equal(rec.to_hf(rec.to_ours(a, CFG)), a, err_msg=rec.hf_name)
        b = rng.standard_normal(_ours_shape(rec, shapes)).astype(np.float32)
        back = rec.to_hf(b)
        assert back.shape == rec.hf_shape(CFG), rec.hf_name
        np.testing.assert_array_equal(rec.to_ours(np.ascontiguousarray(back), CFG), b,
                                      err_msg=rec.hf_name)


def test_orientation_is_hf_s():
    """The layouts themselves (a consistent but wrong pair of transforms would pass the test
    above): HF's fused QKV rows are head-major [heads, (q, k, v), head_dim] with [out, in]
    kernels; ours are [in, ...] with q, k, v on a major axis ([d, 3, N, H])."""
    by_name = {r.hf_name.split(".{layer}.")[-1]: r for r in weights.RECORDS}
    d, N, H, F = CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.intermediate_size
    hf = np.arange(3 * N * H * d, dtype=np.float32).reshape(3 * N * H, d)
    qkv = by_name["attention.query_key_value.weight"].to_ours(hf, CFG)
    for n, k, h, i in [(0, 0, 0, 0), (2, 1, 5, 7), (1, 2, 7, 23)]:
        assert qkv[i, k, n, h] == hf[(n * 3 + k) * H + h, i]  # ours [d, (q, k, v), N, H]
    b = np.arange(3 * N * H, dtype=np.float32)
    qkv_b = by_name["attention.query_key_value.bias"].to_ours(b, CFG)
    assert qkv_b.shape == (3, N, H) and qkv_b[2, 1, 5] == b[(1 * 3 + 2) * H + 5]
    hf = np.arange(d * N * H, dtype=np.float32).reshape(d, N * H)
    out = by_name["attention.dense.weight"].to_ours(hf, CFG)
    assert out[2, 3, 5] == hf[5, 2 * H + 3]
    hf = np.arange(F * d, dtype=np.float32).reshape(F, d)
    assert by_name["mlp.dense_h_to_4h.weight"].to_ours(hf, CFG)[4, 9] == hf[9, 4]


@pytest.mark.parametrize("src_dt,dst_dt", [("float16", "float32"), ("bfloat16", "bfloat16"),
                                           ("float32", "float16")])
def test_direct_copy_equals_reorientation_for_every_kind(src_dt, dst_dt):
    """The loader writes each HF tensor straight into the final buffer (blocked transposes,
    fused cast); it must equal `to_ours` + astype for every record and dtype pair."""
    rng = np.random.default_rng(0)
    shapes = _param_shapes(CFG)
    sdt, ddt = np.dtype(jnp.dtype(src_dt)), np.dtype(jnp.dtype(dst_dt))
    for rec in weights.RECORDS:
        a = rng.standard_normal(rec.hf_shape(CFG)).astype(sdt)
        dst = weights._aligned_empty(_ours_shape(rec, shapes), ddt)
        assert dst.ctypes.data % 64 == 0 and dst.flags.c_contiguous
        rec.copy_into(dst, a)
        np.testing.assert_array_equal(dst, rec.to_ours(a, CFG).astype(ddt), err_msg=rec.hf_name)


class _DictSource:
    def __init__(self, tensors):
        self._t = tensors
        self.shapes = {k: v.shape for k, v in tensors.items()}
        self.origin = {k: "memory" for k in tensors}

    def keys(self):
        return self._t.keys()

    def get(self, key):
        return self._t[key]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_state_dict_and_loader_round_trip_bit_exact(dtype):
    model = GPTNeoX(CFG.replace(param_dtype=dtype), rngs=nnx.Rngs(3))
    tensors = {n: th() for n, shape, dt, th in weights.hf_state_dict(model)}
    assert list(tensors) == weights.hf_names(CFG)
    assert all(t.shape == s for t, s in zip(tensors.values(), weights.hf_shapes(CFG).values()))
    back = weights.load_hf_state_dict(model.config, _DictSource(tensors), where="memory",
                                      param_dtype=weights.PARAM_DTYPES[dtype])
    a = nnx.to_flat_state(nnx.state(model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    for path, v in a:
        got = b[path].get_value()
        assert got.dtype == v.get_value().dtype, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(v.get_value()), err_msg=str(path))


def test_source_with_a_wrong_tensor_names_it():
    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    tensors = {n: th() for n, _, _, th in weights.hf_state_dict(model)}
    tensors["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] = np.zeros((24, 40), np.float32)
    with pytest.raises(weights.CheckpointError,
                       match=r"memory: tensor 'gpt_neox.layers.1.mlp.dense_h_to_4h.weight' has "
                             r"shape \(24, 40\), expected \(40, 24\)"):
        weights.load_hf_state_dict(CFG, _DictSource(tensors), where="memory",
                                   param_dtype=np.float32)


def test_dtype_names():
    assert weights.dtype_name("bfloat16") == "bfloat16"
    assert weights.dtype_name(jnp.float16) == "float16"
    assert weights.dtype_name(np.dtype(np.float32)) == "float32"
    assert weights.dtype_name("int8") is None and weights.dtype_name("nonsense") is None
