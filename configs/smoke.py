"""`--config=configs/smoke.py`: the small run of `pythia_jax.configs.smoke` (shipped with the
package; a Pythia-shaped model on a bundled corpus, minutes on a laptop CPU).

    python scripts/train.py --config=configs/smoke.py --workdir=runs/smoke
"""

from pythia_jax.configs.smoke import get_config  # noqa: F401
