# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by every deployment script (source it, do not run it): the DRY_RUN-aware runner, errors,
# option checks, the layout chooser and the server command line.
#
# DRY_RUN=1: every external command (gcloud, ssh, nvidia-smi, ray, pip, curl, systemctl ...) is
# printed as "+ command" instead of run. The one exception is query(): read-only lookups whose
# answer decides what would be done (nvidia-smi, gcloud ... describe) are printed AND run, so a
# dry run on a real host shows what it would do there; tests put fake binaries first on PATH.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

die() { echo "error: $*" >&2; exit 2; }
log() { echo "==> $*" >&2; }
is_dry_run() { [[ ${DRY_RUN:-0} == 1 ]]; }

# The script's --help: its header comment (the lines after the shebang that start with #).
usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; }

# A word quoted only if the shell needs it, so printed commands stay readable and copy-pasteable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
}

# A command that changes something: DRY_RUN=1 prints it instead.
run() { if is_dry_run; then show "$@"; else "$@"; fi; }

# A read-only lookup the script needs the answer of: printed (to stderr) in a dry run, always run.
query() { if is_dry_run; then show "$@" >&2; fi; "$@"; }

# `run` for a long-lived command: started in the background, its output in LOG, its pid in PIDFILE.
run_background() {
  local logfile=$1 pidfile=$2; shift 2
  if is_dry_run; then show "$@"; echo "#   (in the background, output to $logfile, pid in $pidfile)"; return; fi
  nohup "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

# Repeat a command (given as `run CMD...` or a function that uses run) until it succeeds, for at
# most TIMEOUT seconds. A dry run shows it once.
wait_until() {
  local timeout=$1 what=$2 deadline=$((SECONDS + $1)); shift 2
  if is_dry_run; then "$@"; echo "#   (repeated until it succeeds: $what, at most ${timeout}s)"; return; fi
  log "waiting for $what (at most ${timeout}s)"
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "gave up waiting for $what after ${timeout}s"
    sleep 5
  done
}

# For option parsing: `--flag) need_value "$@"; VAR=$2; shift 2 ;;`
need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"; }
need_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

# The layout chooser (tropical_jax/cluster/layout.py; stdlib only, runs without installing the
# project) sets LAYOUT_CLUSTER, LAYOUT_TP, LAYOUT_CHIPS, LAYOUT_CHIPS_PER_HOST, LAYOUT_HOSTS and, for
# TPUs, LAYOUT_ACCELERATOR_TYPE and LAYOUT_RUNTIME_VERSION. (Plain variables, and the
# ${array[@]+"${array[@]}"} idiom for arrays that may be empty: macOS still ships bash 3.2.)
load_layout() {
  local out key value
  out=$(PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tropical_jax.cluster.layout --format env "$@") \
    || exit 2
  while IFS='=' read -r key value; do printf -v "LAYOUT_$key" '%s' "$value"; done <<<"$out"
}

# new_secret FILE: a random key in FILE (mode 600, its directory 700), unless FILE already holds one
# (restarts keep the key clients have). The key never appears on a command line, where `ps` shows it.
new_secret() {
  local file=$1
  [[ -s $file ]] && return 0
  if is_dry_run; then echo "+ new_secret $file  # a random key, mode 600"; return; fi
  (umask 077 && mkdir -p "$(dirname "$file")" && "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file")
}

# RAY_AUTH: the environment of Ray with token authentication (Ray >= 2.52), for `env` or a remote
# command: every node and the driver read the same token file (TOKEN_FILE).
RAY_AUTH=()
ray_auth() { RAY_AUTH=(RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$1"); }

# The server's arguments for a layout: SERVE_ARGS=(--host ... --cluster ... [--backend ray ...] extra...).
# It listens on every interface, so it requires the API key in KEY_FILE (Authorization: Bearer KEY).
SERVE_ARGS=()
serve_args() {
  local port=$1 cluster=$2 model=$3 multi_host=$4 key_file=$5; shift 5
  SERVE_ARGS=(--host 0.0.0.0 --port "$port" --api-key-file "$key_file" --cluster "$cluster")
  [[ -n $model ]] && SERVE_ARGS+=(--model "$model")
  # More than one host: one Ray actor per worker mesh, the driver joins the Ray head on this host.
  [[ $multi_host == 1 ]] && SERVE_ARGS+=(--backend ray --ray-address auto)
  SERVE_ARGS+=("$@")
}
