#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource and wait until it is ACTIVE.
#
#   TPU_NAME=pythia-v5e ZONE=us-east5-a ACCELERATOR_TYPE=v5litepod-8 tpu/create.sh
#   tpu/create.sh --no-wait        # return once the request is queued
#
# PROVISIONING=spot (default) | reserved | on-demand.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

wait_active=1
for arg in "$@"; do
  case "${arg}" in
    --no-wait) wait_active=0 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "create.sh: unknown argument '${arg}'" ;;
  esac
done

require TPU_NAME ZONE ACCELERATOR_TYPE
accel="$(gcloud_accelerator_type "${ACCELERATOR_TYPE}")"
runtime="${RUNTIME_VERSION:-$(runtime_version_for "${accel}")}"

args=(compute tpus queued-resources create "${QR_ID}" --node-id="${TPU_NAME}" --zone="${ZONE}"
  --accelerator-type="${accel}" --runtime-version="${runtime}")
case "${PROVISIONING}" in
  spot) args+=(--spot) ;;
  reserved) args+=(--reserved) ;;
  on-demand) ;;
  *) die "PROVISIONING must be spot, reserved or on-demand, got '${PROVISIONING}'" ;;
esac

state="$(qr_state)"
if [[ "${state}" == "NOT_FOUND" ]]; then
  log "requesting ${accel} (${PROVISIONING}, ${runtime}) as ${QR_ID} -> node ${TPU_NAME}"
  gc "${args[@]}"
else
  log "queued resource ${QR_ID} already exists (${state})"
fi

[[ "${wait_active}" == 1 ]] || exit 0
while true; do
  state="$(qr_state)"
  case "${state}" in
    ACTIVE)
      log "${QR_ID} is ACTIVE"
      exit 0
      ;;
    FAILED | SUSPENDED | SUSPENDING | NOT_FOUND)
      die "queued resource ${QR_ID} is ${state}; see: gcloud compute tpus queued-resources describe ${QR_ID} --zone=${ZONE}"
      ;;
    *)
      log "${QR_ID}: ${state}; waiting ${POLL_SECONDS}s"
      sleep "${POLL_SECONDS}"
      ;;
  esac
done
