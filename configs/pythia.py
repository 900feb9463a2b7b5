"""`--config=configs/pythia.py:70m`: the Pythia training configs of `pythia_jax.configs.pythia`
(shipped with the package; the fields and their sources are documented there).

    python scripts/train.py --config=configs/pythia.py:160m --workdir=gs://bucket/run \
        --config.train.num_steps=2000 --config.data.path=/data/pile/document
"""

from pythia_jax.configs.pythia import get_config  # noqa: F401
