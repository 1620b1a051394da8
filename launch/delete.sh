#!/usr/bin/env bash
# Delete the TPU VM (or, with --queued, the queued resource and its node).
#
#   launch/delete.sh --name=N --zone=Z [--queued [--qr_name=Q]] [--dry-run]
#
# The workdir (gs://) is kept. Values may come from EFFDET_* variables: see
# common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE

if [[ "$QUEUED" == 1 ]]; then
  gcloud_cmd compute tpus queued-resources delete "$QR_NAME" \
    "--zone=$ZONE" --force --quiet
else
  gcloud_cmd compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet
fi
