#!/usr/bin/env bash
# shellcheck disable=SC2034  # the variables are read by the sourcing scripts
# Shared by the launch/*.sh scripts (sourced, not run): flag parsing with
# environment-variable defaults, and `gcloud` calls that --dry-run prints.
#
# Every value comes from a flag or its EFFDET_* variable (the flag wins):
#   --name             EFFDET_TPU_NAME          TPU VM (node) name
#   --zone             EFFDET_ZONE              e.g. us-central2-b
#   --project          EFFDET_PROJECT           optional (gcloud default)
#   --accelerator_type EFFDET_ACCELERATOR_TYPE  e.g. v4-32
#   --runtime_version  EFFDET_RUNTIME_VERSION   e.g. tpu-ubuntu2204-base
#   --provisioning     EFFDET_PROVISIONING      on-demand | spot |
#                                               preemptible | best-effort
#   --queued           EFFDET_QUEUED=1          a queued resource
#   --qr_name          EFFDET_QR_NAME           default <name>-qr
#   --repo             EFFDET_REPO              git URL of this project
#   --rev              EFFDET_REV               git revision (default main)
#   --remote_dir       EFFDET_REMOTE_DIR        default effdet_jax (in $HOME)
#   --jax              EFFDET_JAX               default jax[tpu]
#   --config           EFFDET_CONFIG            e.g. configs/d7x.py
#   --workdir          EFFDET_WORKDIR           gs://bucket/run
#   --log              EFFDET_LOG               default effdet_train.log
#   --worker           EFFDET_WORKER            logs.sh: default 0
#   --follow           EFFDET_FOLLOW=1          logs.sh: stream
#   --foreground       EFFDET_FOREGROUND=1      run.sh: wait for the end
#   --max_attempts     EFFDET_MAX_ATTEMPTS      loop.sh: default 20
#   --retry_sleep      EFFDET_RETRY_SLEEP       loop.sh: seconds, default 60
#   --dry-run          EFFDET_DRY_RUN=1         print gcloud commands only
# Arguments after `--` go to `python -m effdet_jax.main` (run.sh, loop.sh).

set -euo pipefail

NAME="${EFFDET_TPU_NAME:-}"
ZONE="${EFFDET_ZONE:-}"
PROJECT="${EFFDET_PROJECT:-}"
ACCELERATOR_TYPE="${EFFDET_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${EFFDET_RUNTIME_VERSION:-}"
PROVISIONING="${EFFDET_PROVISIONING:-on-demand}"
QUEUED="${EFFDET_QUEUED:-0}"
QR_NAME="${EFFDET_QR_NAME:-}"
REPO="${EFFDET_REPO:-}"
REV="${EFFDET_REV:-main}"
REMOTE_DIR="${EFFDET_REMOTE_DIR:-effdet_jax}"
JAX_SPEC="${EFFDET_JAX:-jax[tpu]}"
CONFIG="${EFFDET_CONFIG:-}"
WORKDIR="${EFFDET_WORKDIR:-}"
LOG="${EFFDET_LOG:-effdet_train.log}"
WORKER="${EFFDET_WORKER:-0}"
FOLLOW="${EFFDET_FOLLOW:-0}"
FOREGROUND="${EFFDET_FOREGROUND:-0}"
MAX_ATTEMPTS="${EFFDET_MAX_ATTEMPTS:-20}"
RETRY_SLEEP="${EFFDET_RETRY_SLEEP:-60}"
DRY_RUN="${EFFDET_DRY_RUN:-0}"
MAIN_ARGS=()

usage() {
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

parse_flags() {
  while (($#)); do
    case "$1" in
      --name=*) NAME="${1#*=}" ;;
      --zone=*) ZONE="${1#*=}" ;;
      --project=*) PROJECT="${1#*=}" ;;
      --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
      --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
      --provisioning=*) PROVISIONING="${1#*=}" ;;
      --spot) PROVISIONING=spot ;;
      --best-effort) PROVISIONING=best-effort ;;
      --preemptible) PROVISIONING=preemptible ;;
      --queued) QUEUED=1 ;;
      --qr_name=*) QR_NAME="${1#*=}" ;;
      --repo=*) REPO="${1#*=}" ;;
      --rev=*) REV="${1#*=}" ;;
      --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
      --jax=*) JAX_SPEC="${1#*=}" ;;
      --config=*) CONFIG="${1#*=}" ;;
      --workdir=*) WORKDIR="${1#*=}" ;;
      --log=*) LOG="${1#*=}" ;;
      --worker=*) WORKER="${1#*=}" ;;
      --follow) FOLLOW=1 ;;
      --foreground) FOREGROUND=1 ;;
      --max_attempts=*) MAX_ATTEMPTS="${1#*=}" ;;
      --retry_sleep=*) RETRY_SLEEP="${1#*=}" ;;
      --dry-run | --dry_run) DRY_RUN=1 ;;
      -h | --help) usage 0 ;;
      --)
        shift
        MAIN_ARGS=("$@")
        return
        ;;
      *)
        echo "unknown flag: $1 (see --help)" >&2
        exit 2
        ;;
    esac
    shift
  done
  QR_NAME="${QR_NAME:-${NAME}-qr}"
}

require() {
  local var
  for var in "$@"; do
    if [[ -z "${!var}" ]]; then
      echo "missing --$(tr '[:upper:]' '[:lower:]' <<<"$var") (or" \
        "EFFDET_${var}; see --help)" >&2
      exit 2
    fi
  done
}

# One word for a POSIX shell: as it is when plain, else in single quotes.
quote() {
  local q="'\\''"
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}

# Words joined by spaces, each quoted.
quote_all() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  printf '%s' "${out[*]}"
}

# gcloud with the project flag when one is given; under --dry-run the
# command is printed (one line, shell-quoted) and not run.
gcloud_cmd() {
  local cmd=(gcloud "$@")
  if [[ -n "$PROJECT" ]]; then
    cmd+=("--project=$PROJECT")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_all "${cmd[@]}"
    echo
    return 0
  fi
  "${cmd[@]}"
}

# `gcloud compute tpus tpu-vm ssh` on every worker (or $2) running $1.
ssh_workers() {
  gcloud_cmd compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" \
    "--worker=${2:-all}" "--command=$1"
}

# The node's state (READY, PREEMPTED, ...) or NOT_FOUND.
tpu_state() {
  gcloud_cmd compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
    '--format=value(state)' 2>/dev/null || echo NOT_FOUND
}
