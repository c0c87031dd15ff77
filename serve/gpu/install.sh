#!/usr/bin/env bash
# Install this checkout (editable) with JAX for CUDA and Ray into the current Python.
#
# Usage: serve/gpu/install.sh [--cuda 12|13] [--no-ray]
#
#   --cuda 12|13   jax[cuda12] (the project's cuda extra, the default) or jax[cuda13]; both bring
#                  their own CUDA libraries from pip (the host needs only the NVIDIA driver)
#   --no-ray       skip Ray (needed only to span several hosts)
#
# Uses $PYTHON (default python3, >= 3.11); activate a venv first. Run it on every host.
# DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/gpu/gpu.sh
source "$here/gpu.sh"

cuda=12 ray=1
while (($#)); do
  case $1 in
    --cuda) need_value "$@"; cuda=$2; shift 2 ;;
    --no-ray) ray=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $cuda == 12 || $cuda == 13 ]] || die "--cuda must be 12 or 13, got '$cuda'"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than Python 3.11"

extras=()
((ray)) && extras+=(ray)
jax=()
if [[ $cuda == 12 ]]; then
  extras+=(cuda)
else
  jax=("jax[cuda13]>=0.10.2,<0.11")
fi
project=$REPO_ROOT
((${#extras[@]})) && project+="[$(IFS=,; echo "${extras[*]}")]"
run "$PYTHON" -m pip install -U pip
run "$PYTHON" -m pip install -e "$project" ${jax[@]+"${jax[@]}"}
# Not fatal: installing on a host without GPUs (to build an image, say) is fine.
if query nvidia-smi -L >/dev/null 2>&1; then log "installed with jax[cuda$cuda]"; else log "installed; nvidia-smi found no driver here"; fi
