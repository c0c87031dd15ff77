#!/usr/bin/env bash
# Join this GPU host to the Ray cluster of the host that runs the server (start.sh --hosts N there).
#
# Usage: serve/gpu/join.sh --address HEAD_IP:PORT
#
# Install first (install.sh). The head's start.sh prints the address and waits for every host.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/gpu/gpu.sh
source "$here/gpu.sh"

address=''
while (($#)); do
  case $1 in
    --address) need_value "$@"; address=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n $address ]] || die "give --address HEAD_IP:PORT (printed by start.sh on the head)"
[[ $address =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "bad --address '$address' (expected HOST:PORT)"
read_gpus
log "joining $address with $GPU_COUNT GPU(s)"
run ray start --address="$address" --disable-usage-stats
