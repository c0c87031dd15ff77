#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for tropical_jax.
#
# Usage: serve/tpu_vm/create.sh --project P --zone Z --accelerator-type TYPE [--name N]
#            [--runtime-version V] [--spot]
#
#   --runtime-version V   TPU VM software (default for the type, e.g. v2-alpha-tpuv5-lite for v5e)
#   --spot                a Spot VM (cheaper, may be preempted)
#
# Checks the project, zone and accelerator type before creating anything, and prints the layout
# the slice will serve. DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
runtime='' spot=()
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --runtime-version) need_value "$@"; runtime=$2; shift 2 ;;
    --spot) spot=(--spot); shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
tpu_require_type
log "${LAYOUT_ACCELERATOR_TYPE}: ${LAYOUT_CHIPS} chips on ${LAYOUT_HOSTS} host(s); default layout ${LAYOUT_CLUSTER}"
tpu_gcloud create "$TPU_NAME" --accelerator-type="${LAYOUT_ACCELERATOR_TYPE}" \
  --version="${runtime:-${LAYOUT_RUNTIME_VERSION}}" ${spot[@]+"${spot[@]}"}
