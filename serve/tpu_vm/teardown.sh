#!/usr/bin/env bash
# Stop the tropical_jax server and Ray on a TPU VM or slice, then delete it.
#
# Usage: serve/tpu_vm/teardown.sh --project P --zone Z [--name N] [--keep-vm]
#
#   --keep-vm   only stop the server (it drains in-flight requests first) and Ray; keep the VM
#
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
keep_vm=0
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --keep-vm) keep_vm=1; shift ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
tpu_require

# Best effort: a VM that never got this far has nothing to stop, and must still be deleted.
tpu_ssh 0 "sudo systemctl disable --now $SERVICE 2>/dev/null || true" || log "could not stop the server on worker 0"
tpu_ssh all "$VENV/bin/ray stop >/dev/null 2>&1 || true" || log "could not stop Ray on every worker"
if ((keep_vm)); then
  log "server and Ray stopped; $TPU_NAME kept"
else
  tpu_gcloud delete "$TPU_NAME" --quiet
fi
