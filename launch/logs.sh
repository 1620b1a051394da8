#!/usr/bin/env bash
# Show (or --follow) the training log of one worker (default 0) or all.
#
#   launch/logs.sh --name=N --zone=Z [--worker=0|all] [--follow] [--dry-run]
#
# Only process 0 writes summaries (TensorBoard events in the workdir);
# every worker logs its own progress. Values may come from EFFDET_*
# variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE

tail_flags="-n 200"
if [[ "$FOLLOW" == 1 ]]; then
  tail_flags+=" -F"
fi
ssh_workers "tail $tail_flags $(quote "$LOG")" "$WORKER"
