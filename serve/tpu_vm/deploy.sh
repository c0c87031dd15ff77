#!/usr/bin/env bash
# Everything at once: create a TPU VM or slice, install, put the model there, start, print the endpoint.
#
# Usage: serve/tpu_vm/deploy.sh --project P --zone Z --accelerator-type TYPE [--name N]
#            [--runtime-version V] [--spot] [--checkpoint DIR [--convert] [--dtype D]]
#            [start.sh options, e.g. --tp 2 --policy planned -- more server flags]
#
#   --checkpoint DIR   a local checkpoint (ours, or Hugging Face with --convert) for every worker;
#                      without it the server runs the embedded default model
#
# Runs create.sh, install.sh, checkpoint.sh and start.sh (see their --help) with the same
# --name/--zone/--project/--accelerator-type. The start options are checked, by a dry run of
# start.sh, before anything is created. Tear down with teardown.sh. DRY_RUN=1 prints every command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
create_opts=() checkpoint='' checkpoint_opts=() start_opts=() has_model=0
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --runtime-version) need_value "$@"; create_opts+=("$1" "$2"); shift 2 ;;
    --spot) create_opts+=("$1"); shift ;;
    --checkpoint) need_value "$@"; checkpoint=$2; shift 2 ;;
    --convert) checkpoint_opts+=("$1"); shift ;;
    --dtype) need_value "$@"; checkpoint_opts+=("$1" "$2"); shift 2 ;;
    --model) has_model=1; start_opts+=("$1"); shift ;;
    --) start_opts+=("$@"); break ;;
    *) start_opts+=("$1"); shift ;;
  esac
done
tpu_require_type
common=(--name "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" --accelerator-type "$TPU_TYPE")
[[ -n $checkpoint || ${#checkpoint_opts[@]} -eq 0 ]] || die "--convert and --dtype go with --checkpoint DIR"
[[ -z $checkpoint || -d $checkpoint ]] || die "--checkpoint $checkpoint: no such directory"
if [[ -n $checkpoint ]] && ((!has_model)); then
  start_opts=(--model "models/$(basename "$checkpoint")" ${start_opts[@]+"${start_opts[@]}"})
fi

# Bad start options (a TP the slice cannot tile, an unknown flag) fail now, not after creating the VM.
if ! checked=$(DRY_RUN=1 "$here/start.sh" "${common[@]}" ${start_opts[@]+"${start_opts[@]}"} 2>&1 >/dev/null); then
  echo "$checked" >&2
  die "start.sh rejects these options; nothing was created"
fi

"$here/create.sh" "${common[@]}" ${create_opts[@]+"${create_opts[@]}"}
"$here/install.sh" --name "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT"
if [[ -n $checkpoint ]]; then
  "$here/checkpoint.sh" --name "$TPU_NAME" --zone "$TPU_ZONE" --project "$TPU_PROJECT" --src "$checkpoint" \
    ${checkpoint_opts[@]+"${checkpoint_opts[@]}"}
fi
"$here/start.sh" "${common[@]}" ${start_opts[@]+"${start_opts[@]}"}
