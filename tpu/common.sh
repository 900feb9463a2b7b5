# shellcheck shell=bash
# Shared settings and helpers for the tpu/ scripts. Sourced, never run.
#
# Settings come from the environment (or a file named by TPU_ENV, sourced first):
#   TPU_NAME          node id of the TPU VM / pod slice (required)
#   ZONE              e.g. us-east5-a (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  e.g. v5litepod-8, v5p-64 (create.sh only)
#   RUNTIME_VERSION   TPU software version (default: derived from ACCELERATOR_TYPE)
#   QR_ID             queued-resource id (default: ${TPU_NAME}-qr)
#   PROVISIONING      spot | reserved | on-demand (default: spot)
#   REMOTE_DIR        project directory on every worker (default: pythia-jax, relative to ~)
#   POLL_SECONDS      how often create.sh / watch.sh poll (default: 30)
#   STOP_TIMEOUT      launch.sh: seconds a running train.py gets to save and exit after SIGTERM
#                     before it is killed (default: 900)

set -euo pipefail

if [[ -n "${TPU_ENV:-}" ]]; then
  # shellcheck source=/dev/null
  source "${TPU_ENV}"
fi

# TPU_DIR and REPO_ROOT are used by the scripts that source this file.
# shellcheck disable=SC2034
TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034
REPO_ROOT="$(cd "${TPU_DIR}/.." && pwd)"
QR_ID="${QR_ID:-${TPU_NAME:-}-qr}"
PROVISIONING="${PROVISIONING:-spot}"
REMOTE_DIR="${REMOTE_DIR:-pythia-jax}"
POLL_SECONDS="${POLL_SECONDS:-30}"
GCLOUD="${GCLOUD:-gcloud}"
STOP_TIMEOUT="${STOP_TIMEOUT:-900}"
# scripts/train.py's exit status after a preemption save (pythia_jax.train.PREEMPTED_EXIT_STATUS).
# shellcheck disable=SC2034
PREEMPTED_EXIT_STATUS=75

die() {
  echo "error: $*" >&2
  exit 1
}

log() {
  echo "[$(date -u +%H:%M:%S)] $*" >&2
}

require() {
  local v
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || die "${v} is not set (see tpu/README.md)"
  done
}

# gcloud with the project flag when PROJECT is set.
gc() {
  if [[ -n "${PROJECT:-}" ]]; then
    "${GCLOUD}" "$@" --project="${PROJECT}"
  else
    "${GCLOUD}" "$@"
  fi
}

# The TPU software image for an accelerator type.
runtime_version_for() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default RUNTIME_VERSION for accelerator type '$1'; set RUNTIME_VERSION" ;;
  esac
}

# gcloud names v5e slices v5litepod-N; accept v5e-N too.
gcloud_accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# State of the queued resource (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, DELETING), or NOT_FOUND.
qr_state() {
  local s
  if s="$(gc compute tpus queued-resources describe "${QR_ID}" --zone="${ZONE}" \
      --format='value(state.state)' 2>/dev/null)"; then
    echo "${s:-UNKNOWN}"
  else
    echo "NOT_FOUND"
  fi
}

# State of the TPU node (CREATING, READY, PREEMPTED, TERMINATED, …), or NOT_FOUND.
node_state() {
  local s
  if s="$(gc compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" \
      --format='value(state)' 2>/dev/null)"; then
    echo "${s:-UNKNOWN}"
  else
    echo "NOT_FOUND"
  fi
}

# Run a shell command on workers: on_workers WORKER COMMAND (WORKER = all | 0 | 1 …).
on_workers() {
  local worker="$1" cmd="$2"
  gc compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker="${worker}" \
    --command="${cmd}"
}

# Quote arguments for a remote shell.
quote_args() {
  local out="" a
  for a in "$@"; do
    out+="$(printf '%q' "${a}") "
  done
  echo "${out% }"
}
