"""Training configs as code (ml_collections), shipped with the package.

    from pythia_jax.configs import pythia, smoke
    c = pythia.get_config("410m")        # every hyperparameter of EleutherAI's pythia-410m run
    c = smoke.get_config()               # a tiny Pythia-shaped run on a bundled corpus

On the command line the files `configs/pythia.py` and `configs/smoke.py` of the repository
re-export these modules' `get_config`, so `--config=configs/pythia.py:410m` (ml_collections'
config_flags, which loads a config by file path) gives the same config as the import. The
modules here load by file path as well (`importlib.resources.files("pythia_jax.configs")`), for
CLIs installed without the repository.
"""

from pythia_jax.configs import pythia, smoke

__all__ = ["pythia", "smoke"]
