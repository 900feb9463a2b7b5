#!/usr/bin/env bash
# Install the project on every worker: copy the committed tree (git archive HEAD), then make a
# Python 3.11 virtual environment with uv and `pip install -e '.[tpu,gcs]'`.
#
#   tpu/setup.sh                 # the current checkout's HEAD
#   REF=my-branch tpu/setup.sh   # another commit / branch / tag
#
# Uncommitted changes are not copied (commit them, or scp them yourself).
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE

REF="${REF:-HEAD}"
PY_VERSION="${PY_VERSION:-3.11}"
tarball="$(mktemp -d)/pythia-jax.tar.gz"
trap 'rm -rf "$(dirname "${tarball}")"' EXIT

git -C "${REPO_ROOT}" archive --format=tar.gz -o "${tarball}" "${REF}"
log "copying $(git -C "${REPO_ROOT}" rev-parse --short "${REF}") to all workers of ${TPU_NAME}"
gc compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:pythia-jax.tar.gz" --zone="${ZONE}" --worker=all

remote="$(cat <<REMOTE
set -euo pipefail
mkdir -p ${REMOTE_DIR}
tar -xzf pythia-jax.tar.gz -C ${REMOTE_DIR}
cd ${REMOTE_DIR}
python3 -m pip install --user --quiet uv
~/.local/bin/uv venv --quiet --allow-existing --python ${PY_VERSION} .venv
~/.local/bin/uv pip install --quiet --python .venv/bin/python -e '.[tpu,gcs]'
.venv/bin/python -c 'import jax, pythia_jax; print(jax.__version__, jax.device_count(), "devices on", jax.process_count(), "hosts")' || true
REMOTE
)"
on_workers all "${remote}"
log "installed on all workers of ${TPU_NAME} (~/${REMOTE_DIR})"
