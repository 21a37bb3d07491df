#!/usr/bin/env bash
# Train xmr_jax on a Cloud TPU VM pod slice: create (or reuse) the slice, ship this checkout to
# every worker, install it, and start the same `python -m xmr_jax.main` on all workers at once
# (jax.distributed finds the other hosts by itself on TPU VMs).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] [-- extra args for xmr_jax.main]

Creates or reuses the TPU VM slice $TPU_NAME, copies the package to all workers, installs it with
jax[tpu], then runs on every worker (same config everywhere):
  python -m xmr_jax.main --config=$CONFIG --workdir=$WORKDIR [extra args]

Required (environment variable or flag):
  TPU_NAME          --tpu-name NAME        TPU VM name (reused when it already exists)
  ZONE              --zone ZONE            e.g. us-central2-b
  PROJECT           --project ID           GCP project
  CONFIG            --config FILE[:ARGS]   config file relative to the repo, e.g. configs/irra/cuhk_pedes.py
  WORKDIR           --workdir DIR          gs://bucket/run (or a path on an NFS share mounted on every
                                           worker); every host must see the same workdir
Optional:
  ACCELERATOR_TYPE  --accelerator-type T   slice type for creation (default v4-32)
  RUNTIME_VERSION   --version V            TPU VM software version (default tpu-ubuntu2204-base)
  GIT_URL           --git-url URL          pip install from this git URL instead of copying a tarball of
                                           this checkout (git archive of HEAD + uncommitted tracked edits)
  PIP_EXTRAS        --extras E             extras for the install, e.g. "test" (default: none)
  JAX_TPU_SPEC      --jax-spec S           default 'jax[tpu]>=0.10.2,<0.12'
  PYTHON_VERSION    --python V             Python for the workers' venv, made with uv (default 3.11)
  REMOTE_DIR        --remote-dir DIR       checkout folder on the workers (default xmr_jax, under ~)
  SPOT=1            --spot                 create a Spot (preemptible) slice
                    --skip-setup           do not copy/install (package already installed on workers)
                    --detach               run training under nohup (log: ~/xmr_train.log on each worker)
                    --dry-run              print every command it would run, execute none
                    -h, --help             this help

Example:
  TPU_NAME=xmr ZONE=us-central2-b PROJECT=my-proj CONFIG=configs/irra/cuhk_pedes.py \
  WORKDIR=gs://my-bucket/irra_cuhk launch/tpu_pod.sh -- --config.batch_size=256

With a gs:// WORKDIR the workers also get google-cloud-storage (orbax asks the bucket's layout).
Exit status (without --detach: the trainer's, through gcloud ssh; with it, see ~/xmr_train.log):
  0 finished; 1 the run failed (one line on stderr says which); 2 bad options, config, workdir or
  checkpoint; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT (e.g. a Spot preemption notice) after
  checkpointing the running step on every worker: run the same command again (--skip-setup if the
  slice survived) to resume from WORKDIR.
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

DRY_RUN=0
SKIP_SETUP=0
DETACH=0
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
  # --opt=value means --opt value, as in gpu.sh and local_multihost.sh.
  if [[ "$1" == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --detach) DETACH=1 ;;
    --spot) SPOT=1 ;;
    --tpu-name|--zone|--project|--config|--workdir|--accelerator-type|--version|--git-url|--extras|--jax-spec|--python|--remote-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --tpu-name) TPU_NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE="$2" ;;
        --version) RUNTIME_VERSION="$2" ;;
        --git-url) GIT_URL="$2" ;;
        --extras) PIP_EXTRAS="$2" ;;
        --jax-spec) JAX_TPU_SPEC="$2" ;;
        --python) PYTHON_VERSION="$2" ;;
        --remote-dir) REMOTE_DIR="$2" ;;
      esac
      shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; pass trainer flags after '--')" ;;
  esac
  shift
done

missing=()
for var in TPU_NAME ZONE PROJECT WORKDIR CONFIG; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  die "missing required variable(s): ${missing[*]} (set them in the environment or pass the flags; see --help)"
fi
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]>=0.10.2,<0.12}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
REMOTE_DIR="${REMOTE_DIR:-xmr_jax}"
PIP_EXTRAS="${PIP_EXTRAS:-}"
GIT_URL="${GIT_URL:-}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG_FILE="${CONFIG%%:*}"
if [[ -z "$GIT_URL" && ! -f "$REPO_ROOT/$CONFIG_FILE" ]]; then
  die "CONFIG file '$CONFIG_FILE' not found under $REPO_ROOT (give a path relative to the repository root)"
fi
case "$WORKDIR" in
  gs://*) ;;
  /*) echo "tpu_pod.sh: note: WORKDIR=$WORKDIR is a local path; it must be a shared (NFS) mount on every worker" >&2 ;;
  *) die "WORKDIR='$WORKDIR' must be gs://... or an absolute path on a shared file system" ;;
esac

if ! command -v gcloud >/dev/null 2>&1; then
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "tpu_pod.sh: warning: gcloud not found on PATH (install the Google Cloud SDK before a real run)" >&2
  else
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk) and run 'gcloud auth login'"
  fi
fi

# Shell-quotes one word for display: as is when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Prints a command ('+ ' prefix, copy-pastable) and runs it unless --dry-run.
run() {
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

GC=(--zone="$ZONE" --project="$PROJECT")

# 1. Slice: reuse when `describe` finds it, otherwise create it.
if [[ $DRY_RUN -eq 1 ]]; then
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GC[@]}" --format='value(state)'
  echo "# (only when describe fails:)"
  exists=0
elif state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GC[@]}" --format='value(state)' 2>/dev/null)"; then
  echo "tpu_pod.sh: reusing TPU VM $TPU_NAME (state: ${state:-unknown})"
  exists=1
else
  exists=0
fi
if [[ $exists -eq 0 ]]; then
  create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GC[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
fi

SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GC[@]}" --worker=all)
VENV="~/xmr_venv"
PY="$VENV/bin/python"

# 2. Code + install on every worker (uv provides Python >= 3.11; the TPU images ship 3.10).
if [[ $SKIP_SETUP -eq 0 ]]; then
  extras=""
  [[ -z "$PIP_EXTRAS" ]] || extras="[$PIP_EXTRAS]"
  if [[ -n "$GIT_URL" ]]; then
    fetch="rm -rf ~/$REMOTE_DIR && git clone --depth=1 $(printf '%q' "$GIT_URL") ~/$REMOTE_DIR"
  else
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 \
      || die "$REPO_ROOT is not a git checkout; pass --git-url URL to install from a repository"
    git -C "$REPO_ROOT" ls-files --error-unmatch "$CONFIG_FILE" >/dev/null 2>&1 \
      || die "CONFIG file '$CONFIG_FILE' is not tracked by git, so the tarball would not contain it (git add it)"
    TARBALL="${TMPDIR:-/tmp}/xmr_jax_${TPU_NAME}.tar.gz"
    # `git stash create` snapshots uncommitted edits to tracked files (untracked files are not shipped).
    if [[ $DRY_RUN -eq 1 ]]; then
      echo "+ git -C $(quote "$REPO_ROOT") archive --format=tar.gz -o $(quote "$TARBALL") \$(git stash create || echo HEAD)"
    else
      ref="$(git -C "$REPO_ROOT" stash create 2>/dev/null || true)"
      run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" "${ref:-HEAD}"
    fi
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:~/xmr_jax.tar.gz" "${GC[@]}" --worker=all
    fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/xmr_jax.tar.gz -C ~/$REMOTE_DIR"
  fi
  install="set -e; $fetch && cd ~/$REMOTE_DIR"
  install+=" && (python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh)"
  install+=" && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION $VENV"
  gcs_client=""
  [[ "$WORKDIR" != gs://* ]] || gcs_client=" google-cloud-storage"
  install+=" && ~/.local/bin/uv pip install -q --python $PY -e $(printf '%q' ".$extras") $(printf '%q' "$JAX_TPU_SPEC")$gcs_client"
  run "${SSH[@]}" --command="$install"
fi

# 3. Train: the same command on every worker.
train_args=(--config="$CONFIG" --workdir="$WORKDIR" "${EXTRA_ARGS[@]}")
train_cmd="cd ~/$REMOTE_DIR && $PY -m xmr_jax.main$(printf ' %q' "${train_args[@]}")"
if [[ $DETACH -eq 1 ]]; then
  train_cmd="cd ~/$REMOTE_DIR && nohup $PY -m xmr_jax.main$(printf ' %q' "${train_args[@]}") > ~/xmr_train.log 2>&1 &"
fi
run "${SSH[@]}" --command="$train_cmd"
