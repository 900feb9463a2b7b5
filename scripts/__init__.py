"""The command-line scripts. In a clone run them by path (`python scripts/train.py ...`); an
installed pythia-jax ships this folder as the package `pythia_jax_scripts`, each script's `run()`
being the console command `pythia-jax-NAME` (pyproject.toml `[project.scripts]`). Importing the
package imports no script."""
