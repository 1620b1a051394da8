#!/usr/bin/env bash
# Train to the end through preemptions: create, set up, run in the
# foreground; when the slice was preempted (its state is no longer READY),
# delete it, create it again and rerun, which resumes from the workdir's
# last checkpoint. Stops when a run ends with the slice still READY
# (success: exit 0; a failed run: its exit status) or after --max_attempts.
#
#   launch/loop.sh <the flags of create.sh, setup.sh and run.sh> \
#     [--max_attempts=20] [--retry_sleep=60] [--dry-run] [-- MAIN_ARGS]
#
# --dry-run prints the commands of one attempt on a missing slice. Values
# may come from EFFDET_* variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION REPO CONFIG WORKDIR

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  state=NOT_FOUND
  if [[ "$DRY_RUN" != 1 ]]; then
    state="$(tpu_state)"
  fi
  if [[ "$state" != READY ]]; then
    if [[ "$state" != NOT_FOUND ]]; then
      "$HERE/delete.sh" "$@"
    fi
    if ! "$HERE/create.sh" "$@"; then
      echo "attempt $attempt: create failed; retrying" >&2
      sleep "$RETRY_SLEEP"
      continue
    fi
    "$HERE/setup.sh" "$@" || true # a lost worker shows up in the run
  fi
  status=0
  "$HERE/run.sh" --foreground "$@" || status=$?
  if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
  fi
  state="$(tpu_state)"
  if [[ "$state" == READY ]]; then
    exit "$status"
  fi
  echo "attempt $attempt: slice is $state (run status $status);" \
    "recreating and resuming" >&2
  sleep "$RETRY_SLEEP"
done
echo "gave up after $MAX_ATTEMPTS attempts" >&2
exit 1
