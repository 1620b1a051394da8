#!/usr/bin/env bash
# Set up every worker: the project at a git revision in a venv, with
# jax[tpu] and tensorflow-cpu (tf.data only).
#
#   launch/setup.sh --name=N --zone=Z --repo=URL [--rev=main] \
#     [--remote_dir=effdet_jax] [--jax='jax[tpu]'] [--dry-run]
#
# Runs on all workers at once (gcloud ... ssh --worker=all); rerunning it
# moves the checkout to --rev and reinstalls. Values may come from
# EFFDET_* variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE REPO REV

dir="$(quote "$REMOTE_DIR")"
remote="set -e; [ -d $dir/.git ] || git clone $(quote "$REPO") $dir; "
remote+="cd $dir; git fetch origin $(quote "$REV"); "
remote+="git checkout --force FETCH_HEAD; "
remote+="python3 -m venv .venv; . .venv/bin/activate; "
remote+="pip install -q -U pip; "
remote+="pip install -q -e . $(quote "$JAX_SPEC") tensorflow-cpu; "
remote+="python -c \"import effdet_jax\""
ssh_workers "$remote"
