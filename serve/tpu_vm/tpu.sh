# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by the Cloud TPU VM scripts (source it after ../lib.sh): the options every one of them
# takes, their checks, and gcloud ssh/scp to the slice's workers.

TPU_NAME=${TPU_NAME:-tropical-jax}
TPU_ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
TPU_PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
TPU_TYPE=${TPU_TYPE:-}
# On the workers, relative to the login user's home (where gcloud ssh commands start).
VENV=tropical-venv
SRC=tropical_jax
SERVICE=tropical-serve
# The server's API key and Ray's token on the workers (mode 600): relative to the home directory, the
# server's working directory. Generated once here, beside this machine's copy (secrets_dir).
REMOTE_SECRETS=.config/tropical_jax
secrets_dir() { echo "${TROPICAL_STATE_DIR:-$HOME/.local/state/tropical_jax}/tpu-$TPU_NAME"; }

# shellcheck disable=SC2016  # the $NAMES are text here
TPU_OPTIONS_HELP='Options every TPU script takes (or their environment variables):
  --name NAME               TPU VM / slice name ($TPU_NAME, default tropical-jax)
  --zone ZONE               e.g. us-west4-a ($TPU_ZONE or $CLOUDSDK_COMPUTE_ZONE; required)
  --project PROJECT         Google Cloud project ($TPU_PROJECT or $CLOUDSDK_CORE_PROJECT; required)
  --accelerator-type TYPE   e.g. v5litepod-8 (v5e-8), v5litepod-16, v6e-8, v4-8 ($TPU_TYPE)'

# Parses the common options; everything else is left in REST for the script.
REST=()
tpu_parse_args() {
  while (($#)); do
    case $1 in
      --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
      --zone) need_value "$@"; TPU_ZONE=$2; shift 2 ;;
      --project) need_value "$@"; TPU_PROJECT=$2; shift 2 ;;
      --accelerator-type) need_value "$@"; TPU_TYPE=$2; shift 2 ;;
      -h | --help) usage; echo; echo "$TPU_OPTIONS_HELP"; exit 0 ;;
      *) REST+=("$1"); shift ;;
    esac
  done
}

# Checked before anything is created, so a typo costs nothing.
tpu_require() {
  [[ -n $TPU_PROJECT ]] || die "no project: pass --project or set TPU_PROJECT"
  [[ -n $TPU_ZONE ]] || die "no zone: pass --zone or set TPU_ZONE"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "bad TPU name '$TPU_NAME' (lowercase letters, digits, -)"
}

# Also sets the LAYOUT_ variables from the accelerator type (unknown types fail here, with the known forms);
# LAYOUT_ARGS adds the chooser's options (--tp, --roles, ...).
LAYOUT_ARGS=()
tpu_require_type() {
  tpu_require
  [[ -n $TPU_TYPE ]] || die "no accelerator type: pass --accelerator-type (e.g. v5litepod-8) or set TPU_TYPE"
  load_layout --accelerator-type "$TPU_TYPE" ${LAYOUT_ARGS[@]+"${LAYOUT_ARGS[@]}"}
}

tpu_gcloud() { run gcloud compute tpus tpu-vm "$@" --zone="$TPU_ZONE" --project="$TPU_PROJECT"; }

# tpu_ssh WORKER COMMAND: run a bash command on one worker (0, 1, ...) or on all of them ("all").
tpu_ssh() { tpu_gcloud ssh "$TPU_NAME" --worker="$1" --command="$2"; }

# tpu_scp LOCAL REMOTE: copy to every worker.
tpu_scp() { tpu_gcloud scp --recurse "$1" "$TPU_NAME:$2" --worker=all; }

# tpu_address ipAddress|accessConfig.externalIp: worker 0's internal address (the Ray head's) or
# its external one, from gcloud. A dry run without the VM gets a placeholder.
tpu_address() {
  local ip
  ip=$(query gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$TPU_ZONE" --project="$TPU_PROJECT" \
    --format="value(networkEndpoints[0].$1)") || ip=''
  if [[ -z $ip ]]; then
    is_dry_run || die "cannot find worker 0's $1 of $TPU_NAME"
    ip=WORKER0_ADDRESS
  fi
  echo "$ip"
}
