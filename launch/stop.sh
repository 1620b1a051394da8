#!/usr/bin/env bash
# Stop the run: SIGTERM on every worker. The trainer finishes its step,
# all hosts save a checkpoint at that step and exit 0 (as on a TPU
# preemption); run.sh resumes from it.
#
#   launch/stop.sh --name=N --zone=Z [--dry-run]
#
# Values may come from EFFDET_* variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE

# shellcheck disable=SC2016  # expanded on the workers, not here
ssh_workers '[ -f effdet_train.pid ] && kill -TERM "$(cat effdet_train.pid)" || true'
