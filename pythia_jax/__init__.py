"""pythia-jax: EleutherAI's Pythia (GPT-NeoX) in JAX / Flax NNX."""

from pythia_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from pythia_jax.generation import generate
from pythia_jax.model import GPTNeoX, KVCache, forward
from pythia_jax.pretrained import from_pretrained, save_pretrained
from pythia_jax.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "ConfigError", "get_preset", "GPTNeoX", "KVCache", "forward",
           "generate", "from_pretrained", "save_pretrained", "load_tokenizer", "__version__"]

# transformers' habits on the model class: `GPTNeoX.from_pretrained(src, …)`,
# `model.save_pretrained(dst, …)`, `model.generate(ids, …)`, the same functions as above.
# model.py stands below pretrained.py and generation.py (both import it), so it cannot import
# them back; this package file stands above all three and runs before any import of
# pythia_jax.model, so the methods are there wherever GPTNeoX is, with no import running
# back up and no subclass that every loader would have to construct instead.
GPTNeoX.from_pretrained = staticmethod(from_pretrained)
GPTNeoX.save_pretrained = save_pretrained
GPTNeoX.generate = generate
