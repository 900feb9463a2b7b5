#!/usr/bin/env bash
# Run one shell command on every worker, inside the project directory.
#
#   tpu/run.sh 'gcloud storage cp -r gs://my-bucket/pile-standard data/'
#   WORKER=0 tpu/run.sh 'nvidia-smi || true'
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE
[[ $# -eq 1 ]] || die "run.sh: pass exactly one command string"
on_workers "${WORKER:-all}" "cd ${REMOTE_DIR} && $1"
