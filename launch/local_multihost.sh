#!/usr/bin/env bash
# Multi-host training on ONE machine: N local processes (default 2), each with D simulated CPU
# devices (default 2), joined by jax.distributed (coordinator 127.0.0.1:PORT, gloo collectives).
# The same code path as a TPU pod / multi-node GPU job: per-process input shards, global batches
# via jax.make_array_from_process_local_data, orbax checkpoints written by all processes.
#
# Usage:
#   launch/local_multihost.sh [--config=configs/demo.py] [--workdir=/tmp/xmr_jax_multihost]
#                             [--num-processes=2] [--devices-per-process=2] [--port=PORT]
#                             [--dry-run] [--compare] [-- extra xmr_jax.main flags]
#
# Default: runs, for i in 0..N-1, concurrently
#   XLA_FLAGS=--xla_force_host_platform_device_count=D JAX_PLATFORMS=cpu \
#   python -m xmr_jax.main --config=CONFIG --workdir=WORKDIR \
#       --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i [extra flags]
# with stdout+stderr in WORKDIR/logs/process_<i>.log, waits for all of them (if one fails the
# others are stopped) and prints where the logs are. Process 0 writes metrics.jsonl, TensorBoard
# and config; every process writes its shards of WORKDIR/checkpoints.
#
# --compare: instead of xmr_jax.main, runs tests/multihost_driver.py (tiny IRRA, 6 steps on
#   deterministic synthetic batches, no TensorFlow) as N processes x D devices and as 1 process x
#   N*D devices, and prints the loss trajectories and the max |param difference| (float32
#   reduction-order rounding only: expect < 1e-6). Work folders: WORKDIR/compare_{multi,single}.
# --dry-run: prints the commands, runs nothing.
# Environment: VENV (default <repo>/.venv; VENV=none uses the current python), PYTHON (python).
# Signals: SIGTERM/SIGINT to this script are passed to every process; they agree on a step, save
#   it and exit 75.
# Exit status: 0 all processes finished; 1 a process failed (its log's last lines are shown);
#   2 bad options; 75 (EX_TEMPFAIL) the processes were stopped by a signal after checkpointing
#   the running step: run the same command again to resume from WORKDIR.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "local_multihost.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="configs/demo.py"
WORKDIR="/tmp/xmr_jax_multihost"
NUM_PROCESSES=2
DEVICES=2
PORT=""
DRY_RUN=0
COMPARE=0
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --compare) COMPARE=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --num-processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices-per-process=*) DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --config|--workdir|--num-processes|--devices-per-process|--port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --num-processes) NUM_PROCESSES="$2" ;;
        --devices-per-process) DEVICES="$2" ;;
        --port) PORT="$2" ;;
      esac
      shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; pass xmr_jax.main flags after '--')" ;;
  esac
  shift
done

[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num-processes='$NUM_PROCESSES' must be a positive integer"
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process='$DEVICES' must be a positive integer"
[[ -z "$PORT" || "$PORT" =~ ^[0-9]+$ ]] || die "--port='$PORT' must be a TCP port number"
CONFIG_FILE="${CONFIG%%:*}"
if [[ $COMPARE -eq 0 ]]; then
  [[ -f "$CONFIG_FILE" || -f "$REPO_ROOT/$CONFIG_FILE" ]] \
    || die "config file '$CONFIG_FILE' not found (relative to $(pwd) or $REPO_ROOT)"
  if [[ "$CONFIG_FILE" != /* && -f "$CONFIG_FILE" && ! "$(pwd)" -ef "$REPO_ROOT" ]]; then
    CONFIG="$(pwd)/$CONFIG"
  fi
fi
[[ "$WORKDIR" == /* ]] || WORKDIR="$(pwd)/$WORKDIR"

VENV="${VENV:-$REPO_ROOT/.venv}"
if [[ "$VENV" != none ]]; then
  if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  elif [[ $DRY_RUN -eq 0 ]]; then
    die "no venv at $VENV (create it: python3 -m venv $VENV && $VENV/bin/pip install -e '.[test]'; or VENV=none)"
  fi
fi
PYTHON="${PYTHON:-python}"

if [[ -z "$PORT" ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then
    PORT=12355
  else
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
      || die "could not find a free TCP port with $PYTHON (give --port=PORT)"
  fi
fi

quote() {
  local line="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $word"
    else line+=" '${word//\'/\'\\\'\'}'"; fi
  done
  echo "${line# }"
}

PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM

# launch_job NPROC NDEV PORT LOGDIR -- cmd... : starts NPROC copies of cmd (with {i} replaced by
# the process id), each with NDEV CPU devices; waits; returns non-zero if any failed.
launch_job() {
  local nproc="$1" ndev="$2" port="$3" logdir="$4"; shift 5
  local i word cmd status=0 failed=() preempted=0
  PIDS=()
  [[ $DRY_RUN -eq 1 ]] || mkdir -p "$logdir"
  for ((i = 0; i < nproc; i++)); do
    cmd=()
    for word in "$@"; do cmd+=("${word//\{i\}/$i}"); done
    echo "+ XLA_FLAGS=--xla_force_host_platform_device_count=$ndev JAX_PLATFORMS=cpu $(quote "${cmd[@]}") > $logdir/process_$i.log 2>&1 &"
    [[ $DRY_RUN -eq 1 ]] && continue
    XLA_FLAGS="--xla_force_host_platform_device_count=$ndev" JAX_PLATFORMS=cpu \
      TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" "${cmd[@]}" > "$logdir/process_$i.log" 2>&1 &
    PIDS+=("$!")
  done
  [[ $DRY_RUN -eq 1 ]] && return 0
  # Wait for the first to finish; if it failed, stop the others (they would block in collectives).
  local remaining=("${PIDS[@]}")
  while [[ ${#remaining[@]} -gt 0 ]]; do
    local next=()
    for i in "${!PIDS[@]}"; do
      local pid="${PIDS[$i]}"
      [[ " ${remaining[*]} " == *" $pid "* ]] || continue
      if kill -0 "$pid" 2>/dev/null; then next+=("$pid"); continue; fi
      local rc=0
      wait "$pid" || rc=$?
      if [[ $rc -eq 75 ]]; then
        preempted=1  # stopped by a signal after saving: the others stop at the same step
      elif [[ $rc -ne 0 ]]; then
        failed+=("$i"); status=1
        echo "process $i failed (exit status $rc); see $logdir/process_$i.log (last lines below); stopping the others" >&2
        tail -n 15 "$logdir/process_$i.log" >&2 || true
        stop_all
      fi
    done
    remaining=("${next[@]+"${next[@]}"}")
    [[ ${#remaining[@]} -eq 0 ]] || sleep 1
  done
  echo "logs: $(for ((i = 0; i < nproc; i++)); do printf '%s ' "$logdir/process_$i.log"; done)"
  if [[ $status -eq 0 && $preempted -eq 1 ]]; then return 75; fi
  return $status
}

cd "$REPO_ROOT"
if [[ $COMPARE -eq 0 ]]; then
  rc=0
  launch_job "$NUM_PROCESSES" "$DEVICES" "$PORT" "$WORKDIR/logs" -- \
    "$PYTHON" -m xmr_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" --process_id='{i}' \
    "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}" || rc=$?
  if [[ $rc -eq 75 ]]; then
    echo "local_multihost.sh: stopped by a signal after saving a checkpoint in $WORKDIR/checkpoints;" \
      "run the same command again to resume (exit status 75)" >&2
    exit 75
  fi
  if [[ $rc -ne 0 ]]; then
    echo "local_multihost.sh: error: multi-host run failed (logs in $WORKDIR/logs)" >&2
    exit 1
  fi
  [[ $DRY_RUN -eq 1 ]] || echo "done: workdir $WORKDIR (metrics.jsonl, checkpoints/, tensorboard/), logs in $WORKDIR/logs"
  exit 0
fi

[[ ${#EXTRA_ARGS[@]} -eq 0 ]] || die "--compare runs tests/multihost_driver.py, which takes no extra flags (got: ${EXTRA_ARGS[*]})"
# --compare: the same tiny training as N processes x D devices and as 1 process x N*D devices.
MULTI="$WORKDIR/compare_multi"
SINGLE="$WORKDIR/compare_single"
if [[ $DRY_RUN -eq 0 ]]; then rm -rf "$MULTI" "$SINGLE"; fi
DRIVER=tests/multihost_driver.py
launch_job "$NUM_PROCESSES" "$DEVICES" "$PORT" "$MULTI/logs" -- \
  "$PYTHON" "$DRIVER" '{i}' "$NUM_PROCESSES" "$PORT" "$DEVICES" "$MULTI" "$MULTI/out.npz" \
  || die "the $NUM_PROCESSES-process driver run failed (logs in $MULTI/logs)"
launch_job 1 $((NUM_PROCESSES * DEVICES)) "$PORT" "$SINGLE/logs" -- \
  "$PYTHON" "$DRIVER" 0 1 "$PORT" $((NUM_PROCESSES * DEVICES)) "$SINGLE" "$SINGLE/out.npz" \
  || die "the 1-process driver run failed (logs in $SINGLE/logs)"
compare_py='
import sys
import numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
la, lb, pa, pb = a["losses"], b["losses"], a["params"], b["params"]
print(f"losses {sys.argv[3]}: {np.round(la, 6).tolist()}")
print(f"losses {sys.argv[4]}: {np.round(lb, 6).tolist()}")
print(f"max |loss difference|:  {np.abs(la - lb).max():.3g}")
print(f"max |param difference|: {np.abs(pa - pb).max():.3g} over {pa.size} params")
'
echo "+ python -c <compare> $MULTI/out.npz $SINGLE/out.npz"
if [[ $DRY_RUN -eq 0 ]]; then
  "$PYTHON" -c "$compare_py" "$MULTI/out.npz" "$SINGLE/out.npz" \
    "${NUM_PROCESSES}x${DEVICES}" "1x$((NUM_PROCESSES * DEVICES))"
fi
