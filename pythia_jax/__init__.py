"""pythia-jax: EleutherAI's Pythia (GPT-NeoX) in JAX / Flax NNX."""

from pythia_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from pythia_jax.model import GPTNeoX, KVCache, forward

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "ConfigError", "get_preset", "GPTNeoX", "KVCache", "forward",
           "from_pretrained", "save_pretrained", "load_tokenizer", "__version__"]


def __getattr__(name):  # lazy: keep `import pythia_jax` light (no torch / safetensors import)
    if name in ("from_pretrained", "save_pretrained"):
        from pythia_jax import hf
        return getattr(hf, name)
    if name == "load_tokenizer":
        from pythia_jax.tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from pythia_jax.generate import generate
        return generate
    raise AttributeError(f"module 'pythia_jax' has no attribute {name!r}")
