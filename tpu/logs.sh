#!/usr/bin/env bash
# Follow the training log of one worker (default 0, the one that logs metrics).
#
#   tpu/logs.sh            # follow worker 0
#   tpu/logs.sh 3          # follow worker 3
#   tpu/logs.sh all 50     # last 50 lines of every worker, then return
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE

worker="${1:-0}"
lines="${2:-100}"
[[ "${lines}" =~ ^[0-9]+$ ]] || die "logs.sh: line count must be a number, got '${lines}'"
if [[ "${worker}" == "all" ]]; then
  on_workers all "echo \"== \$(hostname)\"; tail -n ${lines} ${REMOTE_DIR}/logs/train.log"
else
  [[ "${worker}" =~ ^[0-9]+$ ]] || die "logs.sh: worker must be a number or 'all', got '${worker}'"
  on_workers "${worker}" "tail -n ${lines} -F ${REMOTE_DIR}/logs/train.log"
fi
