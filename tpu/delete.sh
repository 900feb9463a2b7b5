#!/usr/bin/env bash
# Delete the slice: the queued resource and (with --force) the TPU node it created.
#
#   tpu/delete.sh
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE

state="$(qr_state)"
if [[ "${state}" == "NOT_FOUND" ]]; then
  log "no queued resource ${QR_ID}; deleting node ${TPU_NAME} if it exists"
  if [[ "$(node_state)" != "NOT_FOUND" ]]; then
    gc compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
  fi
  exit 0
fi
log "deleting ${QR_ID} (${state}) and node ${TPU_NAME}"
gc compute tpus queued-resources delete "${QR_ID}" --zone="${ZONE}" --force --quiet
