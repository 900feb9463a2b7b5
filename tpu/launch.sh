#!/usr/bin/env bash
# Start scripts/train.py on every worker (in the background; this returns once it started).
# All arguments go to train.py, after --distributed: every worker runs the same command and
# pythia_jax.distributed finds the others (Cloud TPU metadata). A run that is still going on a
# worker is stopped first: SIGTERM (train.py saves a checkpoint at the next agreed step and
# exits 75), then this waits until its processes have all exited (up to STOP_TIMEOUT seconds,
# then SIGKILL), so the new run starts only after the save is complete.
#
#   tpu/launch.sh --config=configs/pythia.py:1b --workdir=gs://my-bucket/pythia-1b
#
# Worker k logs to ~/pythia-jax/logs/train.log and writes train.py's exit status to
# ~/pythia-jax/logs/train.exit when it ends (0 finished, 75 preempted, anything else failed).
# Set EXTRA_ENV="A=1 B=2" to add environment variables (for example LIBTPU_INIT_ARGS=...).
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE
[[ $# -gt 0 ]] || die "launch.sh: pass train.py's flags, e.g. --config=configs/pythia.py:70m --workdir=gs://bucket/run"
[[ "${STOP_TIMEOUT}" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a whole number of seconds, got '${STOP_TIMEOUT}'"

train_args="$(quote_args --distributed "$@")"
env_args="PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=0 JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax-compile ${EXTRA_ENV:-}"

# logs/train.pid: the process group (session) of logs/run.sh and train.py. run.sh forwards
# SIGTERM to train.py and writes train.exit after train.py has exited.
remote="$(cat <<REMOTE
set -euo pipefail
cd ${REMOTE_DIR}
mkdir -p logs
if [[ -f logs/train.pid ]] && kill -0 -- "-\$(cat logs/train.pid)" 2>/dev/null; then
  pgid="\$(cat logs/train.pid)"
  echo "\$(hostname): stopping the running train.py (process group \${pgid}); waiting for its checkpoint save"
  kill -TERM -- "-\${pgid}" 2>/dev/null || true
  waited=0
  while kill -0 -- "-\${pgid}" 2>/dev/null; do
    if (( waited >= ${STOP_TIMEOUT} )); then
      echo "\$(hostname): train.py still running ${STOP_TIMEOUT}s after SIGTERM (STOP_TIMEOUT); killing it" >&2
      kill -KILL -- "-\${pgid}" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 1
    waited=\$((waited + 1))
  done
  echo "\$(hostname): previous train.py ended (exit \$(cat logs/train.exit 2>/dev/null || echo unknown))"
fi
rm -f logs/train.exit
cat > logs/run.sh <<'RUN'
#!/usr/bin/env bash
cd "\$(dirname "\$0")/.."
env ${env_args} .venv/bin/python scripts/train.py ${train_args} &
child=\$!
trap 'kill -TERM "\$child" 2>/dev/null' TERM INT
status=0
wait "\$child" || status=\$?
while kill -0 "\$child" 2>/dev/null; do  # wait was cut short by a forwarded signal
  status=0
  wait "\$child" || status=\$?
done
echo "\$status" > logs/train.exit
RUN
chmod +x logs/run.sh
setsid nohup logs/run.sh > logs/train.log 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo "\$(hostname): started train.py (pid \$(cat logs/train.pid))"
REMOTE
)"
log "launching on all workers of ${TPU_NAME}: train.py ${train_args}"
on_workers all "${remote}"
