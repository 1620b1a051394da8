#!/usr/bin/env bash
# Start the same training command on every worker.
#
#   launch/run.sh --name=N --zone=Z --config=configs/d7x.py \
#     --workdir=gs://BUCKET/RUN [--foreground] [--log=effdet_train.log] \
#     [--dry-run] [-- --config.train.batch_size=... --mode=train]
#
# Each worker runs `python -m effdet_jax.main --config=... --workdir=...
# --distributed ARGS` (jax.distributed finds the other hosts of the pod
# slice), detached, output appended to ~/LOG, pid in ~/effdet_train.pid.
# --foreground waits for the end (exit status of the workers). A run
# always resumes from the workdir's checkpoints. Values may come from
# EFFDET_* variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE CONFIG WORKDIR

main=(python -m effdet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
  --distributed "${MAIN_ARGS[@]}")
remote="(cd $(quote "$REMOTE_DIR") && . .venv/bin/activate && "
remote+="exec setsid nohup $(quote_all "${main[@]}")) "
remote+=">> $(quote "$LOG") 2>&1 < /dev/null & "
remote+='echo $! > effdet_train.pid'
if [[ "$FOREGROUND" == 1 ]]; then
  remote+='; wait $!'
fi
ssh_workers "$remote"
