#!/usr/bin/env bash
# Join this GPU host to the Ray cluster of the host that runs the server (start.sh --hosts N there).
#
# Usage: serve/gpu/join.sh --address HEAD_IP:PORT --token-file PATH
#
#   --token-file PATH   a copy of the head's Ray token (~/.local/state/tropical_jax/ray_token there):
#                       the head requires it (Ray token authentication)
#
# Install first (install.sh). The head's start.sh prints the address and waits for every host.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/gpu/gpu.sh
source "$here/gpu.sh"

address='' token=''
while (($#)); do
  case $1 in
    --address) need_value "$@"; address=$2; shift 2 ;;
    --token-file) need_value "$@"; token=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n $address ]] || die "give --address HEAD_IP:PORT (printed by start.sh on the head)"
[[ $address =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "bad --address '$address' (expected HOST:PORT)"
[[ -s $token ]] || die "give --token-file PATH: a copy of the head's Ray token (no such file, or empty: '$token')"
read_gpus
log "joining $address with $GPU_COUNT GPU(s)"
ray_auth "$token"
run env "${RAY_AUTH[@]}" ray start --address="$address" --disable-usage-stats
