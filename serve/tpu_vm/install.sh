#!/usr/bin/env bash
# Install tropical_jax with jax[tpu] on every worker of a TPU VM or slice (--worker=all).
#
# Usage: serve/tpu_vm/install.sh --project P --zone Z [--name N] [--python python3.11] [--extras tpu,ray]
#
#   --python P    the workers' interpreter for the venv (>= 3.11; installed with apt if missing)
#   --extras E    the project's extras (default tpu,ray: jax[tpu], and Ray for multi-host slices)
#
# Ships this checkout's committed HEAD (git archive) to ~/tropical_jax on every worker and installs
# it, editable, into ~/tropical-venv. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
remote_python=python3.11 extras=tpu,ray
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --python) need_value "$@"; remote_python=$2; shift 2 ;;
    --extras) need_value "$@"; extras=$2; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $extras =~ ^[a-z0-9,]+$ ]] || die "bad --extras '$extras' (e.g. tpu,ray)"
[[ $remote_python =~ ^python3(\.[0-9]+)?$ ]] || die "bad --python '$remote_python' (e.g. python3.11)"
tpu_require

tarball=${TMPDIR:-/tmp}/$SRC-$$.tar.gz
run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
tpu_scp "$tarball" "$SRC.tar.gz"
tpu_ssh all "set -euo pipefail
command -v $remote_python >/dev/null || { sudo apt-get -qq update && sudo apt-get -qq install -y $remote_python $remote_python-venv; }
rm -rf $SRC && mkdir $SRC && tar -xzf $SRC.tar.gz -C $SRC
[ -x $VENV/bin/python ] || $remote_python -m venv $VENV
$VENV/bin/pip install -q -U pip
$VENV/bin/pip install -q -e './${SRC}[$extras]'
# JAX warns that the TPU runtime starts slower without transparent hugepages (v5e and newer).
echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled >/dev/null"
log "installed on every worker of $TPU_NAME: ~/$VENV/bin/python (jax[tpu])"
