#!/usr/bin/env bash
# Start scripts/train.py on every worker (in the background; this returns at once).
# All arguments go to train.py, after --distributed: every worker runs the same command and
# jax.distributed.initialize() finds the others (Cloud TPU metadata). A run that is already
# going on a worker is stopped first.
#
#   tpu/launch.sh --config=configs/pythia.py:1b --workdir=gs://my-bucket/pythia-1b
#
# Worker k logs to ~/pythia-jax/logs/train.log and writes its exit status to
# ~/pythia-jax/logs/train.exit when train.py ends. Set EXTRA_ENV="A=1 B=2" to add environment
# variables (for example LIBTPU_INIT_ARGS=...).
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE
[[ $# -gt 0 ]] || die "launch.sh: pass train.py's flags, e.g. --config=configs/pythia.py:70m --workdir=gs://bucket/run"

train_args="$(quote_args --distributed "$@")"
env_args="PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=0 JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax-compile ${EXTRA_ENV:-}"

remote="$(cat <<REMOTE
set -euo pipefail
cd ${REMOTE_DIR}
mkdir -p logs
if [[ -f logs/train.pid ]] && kill -0 "\$(cat logs/train.pid)" 2>/dev/null; then
  kill -- "-\$(cat logs/train.pid)" 2>/dev/null || kill "\$(cat logs/train.pid)"; sleep 5
fi
rm -f logs/train.exit
cat > logs/run.sh <<'RUN'
#!/usr/bin/env bash
cd "\$(dirname "\$0")/.."
env ${env_args} .venv/bin/python scripts/train.py ${train_args}
echo \$? > logs/train.exit
RUN
chmod +x logs/run.sh
setsid nohup logs/run.sh > logs/train.log 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo "\$(hostname): started train.py (pid \$(cat logs/train.pid))"
REMOTE
)"
log "launching on all workers of ${TPU_NAME}: train.py ${train_args}"
on_workers all "${remote}"
