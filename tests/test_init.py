"""Pythia's initialization (reference doc 1.6), measured on the parameters training starts from.

small_init N(0, sqrt(2 / (5 d))): embed_in, query_key_value, dense_h_to_4h and embed_out.
wang_init N(0, 2 / (L sqrt(d))): attention.dense and dense_4h_to_h.
6.9b / 12b: normal(0.02) and scaled_normal 0.02 / sqrt(2 L) instead. Biases 0, LayerNorm 1 / 0.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from pythia_jax import train
from pythia_jax.config import get_preset
from pythia_jax.configs import pythia as pythia_configs
from pythia_jax.model import GPTNeoX, init_std

# reference doc 1.6 "Computed stds" (small / wang; 6.9b and 12b: normal / scaled_normal)
DOC_STDS = {
    "70m": (0.0279508, 0.0147314), "160m": (0.0228218, 0.00601407),
    "410m": (0.0197642, 0.00260417), "1b": (0.0139754, 0.00276214),
    "1.4b": (0.0139754, 0.00184142), "2.8b": (0.0125, 0.00123526),
    "6.9b": (0.02, 0.0025), "12b": (0.02, 0.00235702),
}

INPUT_GROUP = ("embed_in/embedding", "embed_out/embedding",
               "layers/attention/query_key_value/kernel", "layers/mlp/dense_h_to_4h/kernel")
OUTPUT_GROUP = ("layers/attention/dense/kernel", "layers/mlp/dense_4h_to_h/kernel")
ZEROS = ("layers/attention/query_key_value/bias", "layers/attention/dense/bias",
         "layers/mlp/dense_h_to_4h/bias", "layers/mlp/dense_4h_to_h/bias",
         "layers/input_layernorm/bias", "layers/post_attention_layernorm/bias",
         "final_layer_norm/bias")
ONES = ("layers/input_layernorm/scale", "layers/post_attention_layernorm/scale",
        "final_layer_norm/scale")


@pytest.mark.parametrize("size", sorted(DOC_STDS))
def test_init_stds_of_every_size_match_the_reference(size):
    cfg = get_preset(size)
    small, wang = DOC_STDS[size]
    assert init_std(cfg.init_method, cfg) == pytest.approx(small, rel=2e-5)
    assert init_std(cfg.output_init_method, cfg) == pytest.approx(wang, rel=2e-5)


def _flat(params) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_groups(flat: dict, in_std: float, out_std: float):
    assert set(INPUT_GROUP + OUTPUT_GROUP + ZEROS + ONES) == set(flat), sorted(flat)
    for name, want in [(n, in_std) for n in INPUT_GROUP] + [(n, out_std) for n in OUTPUT_GROUP]:
        x = flat[name].astype(np.float64).ravel()
        n = x.size
        std = x.std()
        # sample std of n normals has relative s.e. 1/sqrt(2n) (< 0.1% here); 1% is > 10 s.e.
        assert std == pytest.approx(want, rel=0.01), (name, std, want)
        assert abs(x.mean()) < 5 * want / math.sqrt(n), (name, x.mean())
        # a normal, not a truncated normal: ~4.55% of the draws lie beyond 2 sigma
        tail = np.mean(np.abs(x) > 2 * want)
        assert 0.04 < tail < 0.051, (name, tail)
    for name in ZEROS:
        assert np.all(flat[name] == 0.0), name
    for name in ONES:
        assert np.all(flat[name] == 1.0), name


def test_training_state_starts_from_pythia_init_70m():
    """`create_train_state` on configs/pythia.py:70m (vocab cut to 4096 rows to keep it small;
    the stds depend on d and L only): each parameter group has its Pythia std, fp32."""
    c = pythia_configs.get_config("70m")
    c.model.vocab_size = 4096
    mesh = train.make_mesh(c)
    state, _ = train.create_train_state(c, mesh)
    flat = _flat(state.params)
    assert all(x.dtype == np.float32 for x in flat.values())
    small, wang = DOC_STDS["70m"]
    _check_groups(flat, small, wang)
    # the seed matters (train.seed = 1234), and is used
    assert c.train.seed == 1234


@pytest.mark.parametrize("size", ["6.9b", "12b"])
def test_normal_and_scaled_normal_init_for_6_9b_and_12b(size):
    """The real layer count (32 / 36) with a narrow width: normal(0.02) does not depend on d,
    scaled_normal 0.02 / sqrt(2 L) only on L."""
    cfg = get_preset(size).replace(hidden_size=128, num_heads=4, intermediate_size=512,
                                   vocab_size=1024)
    assert (cfg.init_method, cfg.output_init_method) == ("normal", "scaled_normal")
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(GPTNeoX(cfg, rngs=nnx.Rngs(1234)),
                                                        nnx.Param)))()
    _check_groups(_flat(params), *DOC_STDS[size])
