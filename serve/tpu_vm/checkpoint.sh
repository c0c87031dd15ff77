#!/usr/bin/env bash
# Put a model on every worker of a TPU VM or slice: copy a checkpoint, or convert a Hugging Face one.
#
# Usage: serve/tpu_vm/checkpoint.sh --project P --zone Z [--name N] (--src DIR | --on-workers PATH)
#            [--convert] [--dtype bfloat16|float32] [--dest NAME]
#
#   --src DIR           a local checkpoint directory (ours, or Hugging Face safetensors) to copy
#   --on-workers PATH   a Hugging Face directory already on every worker (e.g. fetched there); implies --convert
#   --convert           convert the Hugging Face directory to our orbax checkpoint on every worker
#                       (python -m tropical_jax.checkpoint convert)
#   --dtype D           the converted weights' dtype (default bfloat16)
#   --dest NAME         the model's name on the workers: ~/models/NAME (default: the source's name)
#
# Then start the server with `start.sh --model models/NAME`. DRY_RUN=1 prints the commands.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
src='' on_workers='' convert=0 dtype=bfloat16 dest=''
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --src) need_value "$@"; src=$2; shift 2 ;;
    --on-workers) need_value "$@"; on_workers=$2; convert=1; shift 2 ;;
    --convert) convert=1; shift ;;
    --dtype) need_value "$@"; dtype=$2; shift 2 ;;
    --dest) need_value "$@"; dest=$2; shift 2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
tpu_require
[[ -n $src || -n $on_workers ]] || die "give --src DIR (copy from here) or --on-workers PATH (convert there)"
[[ -z $src || -z $on_workers ]] || die "--src and --on-workers exclude each other"
[[ -z $src || -d $src ]] || die "--src $src: no such directory"
[[ -z $on_workers || $on_workers =~ ^[A-Za-z0-9._/~-]+$ ]] || die "bad --on-workers path '$on_workers'"
[[ $dtype == bfloat16 || $dtype == float32 ]] || die "--dtype must be bfloat16 or float32, got '$dtype'"
dest=${dest:-$(basename "${src:-$on_workers}")}
[[ $dest =~ ^[A-Za-z0-9._-]+$ ]] || die "bad --dest '$dest' (letters, digits, . _ -)"

model=models/$dest
if [[ -n $src ]]; then
  # Hugging Face sources land beside their converted form; our checkpoints are the model itself.
  copy_to=$model
  ((convert)) && copy_to=$model-hf
  tpu_ssh all "mkdir -p models && rm -rf $copy_to"
  tpu_scp "$src" "$copy_to"
  hf_dir=$copy_to
else
  hf_dir=$on_workers
fi
if ((convert)); then
  tpu_ssh all "$VENV/bin/python -m tropical_jax.checkpoint convert $hf_dir $model --dtype $dtype"
fi
log "model on every worker: ~/$model (start.sh --model $model)"
