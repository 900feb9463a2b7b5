"""scan_layers and remat: same numbers as the unrolled, non-rematerialized model; each remat
policy saves what its name says (checked on the saved residuals, no compile needed)."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pythia_jax.config import ModelConfig
from pythia_jax.model import GPTNeoX

# B=2, T=8, L=2, N=4, H=16, D=64, F=256, V=128: every dimension distinct from the others that
# matter below, so residual shapes identify what was saved.
B, T, L, N, H, D, F, V = 2, 8, 2, 4, 16, 64, 256, 128
BASE = ModelConfig(hidden_size=D, num_layers=L, num_heads=N, intermediate_size=F, vocab_size=V,
                   scan_layers=False)  # the unrolled reference


def _ids():
    return jax.random.randint(jax.random.key(1), (B, T), 0, V)


def _loss_fn(graphdef, ids):
    def loss(state):
        logits = nnx.merge(graphdef, state)(ids)
        nll = jax.nn.logsumexp(logits[:, :-1], -1) - jnp.take_along_axis(
            logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
        return jnp.mean(nll), logits
    return loss


def _logits_and_grads(cfg):
    graphdef, state = nnx.split(GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    (_, logits), grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, _ids()), has_aux=True))(state)
    return logits, grads


def _assert_close(a, b, what):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=what)


@pytest.mark.slow
def test_scan_and_remat_match_unrolled_logits_and_gradients():
    ref_logits, ref_grads = _logits_and_grads(BASE)
    # the gradients are not trivially zero / equal across leaves
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(ref_grads))
    # (dots_saveable only changes what is saved, like the others: see the residuals test)
    for kw in (dict(scan_layers=True), dict(scan_layers=True, remat="full"),
               dict(scan_layers=False, remat="save_attn_out")):
        logits, grads = _logits_and_grads(BASE.replace(**kw))
        _assert_close(logits, ref_logits, f"logits {kw}")
        _assert_close(grads, ref_grads, f"grads {kw}")


def _stacked_residuals(remat: str) -> list[tuple[int, ...]]:
    """Shapes of the per-layer residuals (outputs of the layer scan) saved for the backward."""
    cfg = BASE.replace(scan_layers=True, remat=remat)
    graphdef, state = nnx.split(GPTNeoX(cfg, rngs=nnx.Rngs(0)))
    ids = _ids()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(lambda s: _loss_fn(graphdef, ids)(s)[0], state)
    shapes = []
    for line in buf.getvalue().splitlines():
        m = re.match(r"\w+\[([\d,]*)\] output of scan", line)
        if m:
            shapes.append(tuple(int(s) for s in m.group(1).split(",") if s))
    return shapes


def test_remat_policies_save_what_they_say():
    none = set(_stacked_residuals("none"))
    full = set(_stacked_residuals("full"))
    dots = set(_stacked_residuals("dots_saveable"))
    attn = set(_stacked_residuals("save_attn_out"))
    scores = (L, B, N, T, T)          # attention probabilities (xla attention)
    layer_in = (L, B, T, D)           # the scan carry: every policy keeps each layer's input
    qkv, mlp_h, attn_out = (L, B, T, 3, N, H), (L, B, T, F), (L, B, T, N, H)
    assert scores in none and mlp_h in none
    assert full == {layer_in}
    assert attn == {layer_in, attn_out}
    assert {qkv, mlp_h} <= dots and scores not in dots
    assert len(none) > len(dots) > len(attn) > len(full)
