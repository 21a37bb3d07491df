#!/usr/bin/env bash
# Train xmr_jax on one local GPU with debugging defaults (frequent logging, optional profiler trace).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [options] [-- extra args for xmr_jax.main]

Runs on one GPU (CUDA_VISIBLE_DEVICES, default 0) inside the project venv:
  python -m xmr_jax.main --config=$CONFIG --workdir=$WORKDIR --config.log_every=$LOG_EVERY \
      [--config.profile_steps=START,STOP --config.profile_dir=$WORKDIR/profile] [extra args]

Options (or environment variables):
  --config FILE[:ARGS]   CONFIG     config file (default configs/demo.py)
  --workdir DIR          WORKDIR    run folder (default /tmp/xmr_jax_gpu/<config name>)
  --log-every N          LOG_EVERY  overrides config.log_every (default 10: frequent logging)
  --profile[=START,STOP]            jax.profiler trace of steps START..STOP (default 10,20) via the
                                    trainer keys config.profile_steps and config.profile_dir
                                    (PROFILE_DIR, default $WORKDIR/profile; open with TensorBoard)
  --venv DIR             VENV       Python venv to activate (default <repo>/.venv; VENV=none: use
                                    the current python)
  --dry-run                         print the commands, run nothing
  -h, --help                        this help
Everything after '--' goes to xmr_jax.main, e.g. -- --config.eval_every_epochs=1 --config.batch_size=32
ALLOW_NO_GPU=1 runs even without nvidia-smi / a CUDA jax (JAX falls back to CPU).
WORKDIR may be gs://bucket/run (or any etils.epath filesystem).

Exit status (the trainer's; it replaces this script, so signals reach it directly):
  0   finished
  1   the run failed: a checkpoint could not be saved, the loss diverged, a file could not be
      written (one line on stderr says which)
  2   bad options, config, workdir or checkpoint (one line on stderr names it)
  75  (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after checkpointing the running step:
      run the same command again to resume
EOF
}

die() { echo "gpu.sh: error: $*" >&2; exit 2; }
warn() { echo "gpu.sh: warning: $*" >&2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
PROFILE=""
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --profile) PROFILE="10,20" ;;
    --profile=*) PROFILE="${1#--profile=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --log-every=*) LOG_EVERY="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --config|--workdir|--log-every|--venv)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --log-every) LOG_EVERY="$2" ;;
        --venv) VENV="$2" ;;
      esac
      shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; pass trainer flags after '--')" ;;
  esac
  shift
done

CONFIG="${CONFIG:-configs/demo.py}"
CONFIG_FILE="${CONFIG%%:*}"
[[ -f "$CONFIG_FILE" || -f "$REPO_ROOT/$CONFIG_FILE" ]] \
  || die "CONFIG file '$CONFIG_FILE' not found (relative to $(pwd) or $REPO_ROOT)"
# The trainer runs from the repository root: make paths given relative to the caller absolute.
if [[ "$CONFIG_FILE" != /* && -f "$CONFIG_FILE" && ! "$(pwd)" -ef "$REPO_ROOT" ]]; then
  CONFIG="$(pwd)/$CONFIG"
fi
name="$(basename "$CONFIG_FILE" .py)"
WORKDIR="${WORKDIR:-/tmp/xmr_jax_gpu/$name}"
[[ "$WORKDIR" == /* || "$WORKDIR" == *://* ]] || WORKDIR="$(pwd)/$WORKDIR"
LOG_EVERY="${LOG_EVERY:-10}"
[[ "$LOG_EVERY" =~ ^[1-9][0-9]*$ ]] || die "LOG_EVERY='$LOG_EVERY' must be a positive integer"
if [[ -n "$PROFILE" && ! "$PROFILE" =~ ^[0-9]+,[0-9]+$ ]]; then
  die "--profile=$PROFILE must be START,STOP step numbers, e.g. --profile=10,20"
fi
VENV="${VENV:-$REPO_ROOT/.venv}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

# The GPU: a clear message instead of JAX silently training on the CPU.
if command -v nvidia-smi >/dev/null 2>&1; then
  if [[ $DRY_RUN -eq 0 ]]; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
      || warn "nvidia-smi failed; the driver may not be loaded"
  fi
elif [[ "${ALLOW_NO_GPU:-0}" == 1 || $DRY_RUN -eq 1 ]]; then
  warn "nvidia-smi not found: no NVIDIA driver visible; JAX will run on the CPU"
else
  die "nvidia-smi not found: this machine shows no NVIDIA GPU/driver (set ALLOW_NO_GPU=1 to run on the CPU anyway)"
fi

# Prints a command ('+ ' prefix) and runs it unless --dry-run; EXEC=1: replaces this shell by it.
run() {
  local line="+" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"
    else line+=" '${word//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
  if [[ $DRY_RUN -eq 0 && "${EXEC:-0}" == 1 ]]; then exec "$@"; fi
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

if [[ "$VENV" != none ]]; then
  if [[ -f "$VENV/bin/activate" ]]; then
    echo "+ source $VENV/bin/activate"
    # shellcheck disable=SC1091
    [[ $DRY_RUN -eq 1 ]] || source "$VENV/bin/activate"
  elif [[ $DRY_RUN -eq 1 ]]; then
    warn "no venv at $VENV (create it: python3 -m venv $VENV && $VENV/bin/pip install -e '.[test]' 'jax[cuda12]')"
  else
    die "no venv at $VENV (create it: python3 -m venv $VENV && $VENV/bin/pip install -e '.[test]' 'jax[cuda12]'; or VENV=none)"
  fi
fi

if [[ $DRY_RUN -eq 0 && "${ALLOW_NO_GPU:-0}" != 1 ]]; then
  python -c "import jax; jax.devices('gpu')" >/dev/null 2>&1 \
    || die "this python's JAX sees no GPU (install a CUDA build: pip install 'jax[cuda12]'; or ALLOW_NO_GPU=1)"
fi

cmd=(python -m xmr_jax.main --config="$CONFIG" --workdir="$WORKDIR" --config.log_every="$LOG_EVERY")
if [[ -n "$PROFILE" ]]; then
  cmd+=(--config.profile_steps="$PROFILE" --config.profile_dir="${PROFILE_DIR:-$WORKDIR/profile}")
fi
cmd+=("${EXTRA_ARGS[@]}")
cd "$REPO_ROOT"
# exec: a SIGTERM sent to this script's pid (a scheduler's preemption notice) reaches the trainer,
# which saves and exits 75; its exit status is this script's.
EXEC=1 run "${cmd[@]}"
