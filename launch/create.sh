#!/usr/bin/env bash
# Create a TPU VM (or a queued resource) for effdet_jax.
#
#   launch/create.sh --name=N --zone=Z --accelerator_type=v4-32 \
#     --runtime_version=tpu-ubuntu2204-base [--spot|--preemptible] \
#     [--queued [--best-effort] [--qr_name=Q]] [--project=P] [--dry-run]
#
# A plain TPU VM is created synchronously. A queued resource (--queued)
# waits in Google's queue; this script then polls until it is ACTIVE
# (exit 1 if it FAILED or was SUSPENDED). --best-effort needs --queued
# (gcloud alpha). Values may come from EFFDET_* variables: see common.sh.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
parse_flags "$@"
require NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION

tier=()
case "$PROVISIONING" in
  on-demand) ;;
  spot) tier=(--spot) ;;
  preemptible) tier=(--preemptible) ;;
  best-effort) tier=(--best-effort) ;;
  *)
    echo "--provisioning: on-demand | spot | preemptible | best-effort" >&2
    exit 2
    ;;
esac

if [[ "$QUEUED" != 1 ]]; then
  if [[ "$PROVISIONING" == best-effort ]]; then
    echo "--best-effort needs --queued (a queued resource)" >&2
    exit 2
  fi
  gcloud_cmd compute tpus tpu-vm create "$NAME" "--zone=$ZONE" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    "${tier[@]}"
  exit 0
fi

track=()
if [[ "$PROVISIONING" == best-effort ]]; then
  track=(alpha)  # the best-effort tier is an alpha flag
elif [[ "$PROVISIONING" == preemptible ]]; then
  tier=(--spot)  # queued resources offer spot, not preemptible
fi
gcloud_cmd "${track[@]}" compute tpus queued-resources create "$QR_NAME" \
  "--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE" \
  "--runtime-version=$RUNTIME_VERSION" "--node-id=$NAME" "${tier[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
while true; do
  state="$(gcloud_cmd compute tpus queued-resources describe "$QR_NAME" \
    "--zone=$ZONE" '--format=value(state.state)')"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING)
      echo "queued resource $QR_NAME is $state" >&2
      exit 1
      ;;
  esac
  echo "queued resource $QR_NAME: $state; waiting" >&2
  sleep 30
done
