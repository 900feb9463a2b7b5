"""Tiny random `transformers` GPT-NeoX models for parity tests (no network)."""

from __future__ import annotations

import numpy as np


def tiny_hf_config(**kw):
    from transformers import GPTNeoXConfig
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, rotary_pct=0.25, rotary_emb_base=10000,
                max_position_embeddings=128, layer_norm_eps=1e-5, use_parallel_residual=True,
                hidden_act="gelu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return GPTNeoXConfig(**base)


def tiny_hf_model(seed: int = 0, init_scale: float | None = None, **kw):
    """A random GPTNeoXForCausalLM in eval mode. `init_scale` rescales every weight and bias
    to N(0, init_scale) (LayerNorms around 1) so logits are far from uniform."""
    import torch
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(tiny_hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight")
                        else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_scale or 0.02 + 0.03 * (name.endswith("bias")))
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.float().numpy()
