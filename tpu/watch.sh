#!/usr/bin/env bash
# Keep a training run going through preemptions: start it, and whenever the slice is preempted
# (queued resource SUSPENDED / FAILED, node PREEMPTED) delete it, request it again, reinstall,
# and relaunch. train.py resumes from the newest checkpoint in --workdir, so the workdir must be
# on shared storage (gs://…). On a healthy slice, train.py's exit status on worker 0 decides:
# 0 (finished) ends the watch; 75 (preempted: SIGTERM, checkpoint saved) relaunches it; any other
# status (failed) relaunches it too. Every relaunch and re-creation counts against MAX_RESTARTS.
#
#   TPU_NAME=… ZONE=… ACCELERATOR_TYPE=v5p-64 tpu/watch.sh \
#       --config=configs/pythia.py:1b --workdir=gs://my-bucket/pythia-1b
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE
[[ $# -gt 0 ]] || die "watch.sh: pass train.py's flags (as for launch.sh)"
MAX_RESTARTS="${MAX_RESTARTS:-100}"

# RUNNING | EXITED <status> | NONE, from worker 0 (RUNNING while any process of the run's
# process group is alive: train.py saving after SIGTERM counts as running).
train_status() {
  local out
  out="$(on_workers 0 "cd ${REMOTE_DIR} 2>/dev/null || { echo NONE; exit 0; }
if [[ -f logs/train.pid ]] && kill -0 -- \"-\$(cat logs/train.pid)\" 2>/dev/null; then echo RUNNING
elif [[ -f logs/train.exit ]]; then echo \"EXITED \$(cat logs/train.exit)\"
else echo NONE; fi" 2>/dev/null | tail -n 1)" || out="UNREACHABLE"
  echo "${out:-UNREACHABLE}"
}

# Request the slice, install, launch. A failure here (capacity, a FAILED request) is logged and
# the loop tries again on its next poll.
bring_up() {
  if ! { "${TPU_DIR}/create.sh" && "${TPU_DIR}/setup.sh" && "${TPU_DIR}/launch.sh" "$@"; }; then
    log "bringing ${TPU_NAME} up failed; retrying after ${POLL_SECONDS}s"
  fi
}

restarts=0
restart() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) || die "gave up after ${MAX_RESTARTS} restarts"
  log "restart ${restarts}/${MAX_RESTARTS}: $1"
}

case "$(qr_state)" in
  NOT_FOUND) bring_up "$@" ;;
  ACTIVE)
    if [[ "$(train_status)" != RUNNING ]]; then
      "${TPU_DIR}/launch.sh" "$@"
    fi
    ;;
  *) ;;  # handled by the loop
esac

while true; do
  qr="$(qr_state)"
  case "${qr}" in
    ACTIVE)
      node="$(node_state)"
      if [[ "${node}" == PREEMPTED || "${node}" == TERMINATED ]]; then
        restart "node ${TPU_NAME} is ${node}"
        "${TPU_DIR}/delete.sh"
        bring_up "$@"
      else
        status="$(train_status)"
        case "${status}" in
          RUNNING | UNREACHABLE) ;;
          "EXITED 0")
            log "train.py finished (exit 0); the slice is still up: tpu/delete.sh to release it"
            exit 0
            ;;
          "EXITED ${PREEMPTED_EXIT_STATUS}")
            restart "train.py was preempted (exit ${PREEMPTED_EXIT_STATUS}: SIGTERM, checkpoint saved); relaunching"
            "${TPU_DIR}/launch.sh" "$@"
            ;;
          *)
            restart "train.py is not running (${status})"
            "${TPU_DIR}/launch.sh" "$@"
            ;;
        esac
      fi
      ;;
    SUSPENDED | SUSPENDING | FAILED)
      restart "queued resource ${QR_ID} is ${qr}"
      "${TPU_DIR}/delete.sh"
      bring_up "$@"
      ;;
    NOT_FOUND)
      restart "queued resource ${QR_ID} disappeared"
      bring_up "$@"
      ;;
    *) ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, DELETING: wait
  esac
  sleep "${POLL_SECONDS}"
done
