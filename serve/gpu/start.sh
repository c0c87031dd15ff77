#!/usr/bin/env bash
# Start the tropical_jax server on this GPU host under a supervisor, wait for /health, print the endpoint.
#
# Usage: serve/gpu/start.sh [--model DIR] [--convert HF_DIR] [--dtype D] [--cluster LAYOUT | --tp N]
#            [--roles PM|PD|C] [--policy P] [--port 8000] [--hosts N] [--api-key-file F]
#            [--health-timeout 1800] [-- more server flags]
#
#   --model DIR         checkpoint to serve (default: the embedded model)
#   --convert HF_DIR    first convert this Hugging Face directory into --model DIR
#                       (python -m tropical_jax.checkpoint convert; --dtype, default bfloat16)
#   --cluster LAYOUT    override the layout chosen from nvidia-smi (8 GPUs: 2P2M at TP2)
#   --tp N, --roles R   or let the chooser pick with this TP size / role split (TP is raised until
#                       the model's weights fit half of the GPUs' memory)
#   --hosts N           serve over N hosts with Ray: starts the Ray head here, on this host's private
#                       address and with token authentication, waits for the other N-1 hosts
#                       (serve/gpu/join.sh on each, with a copy of the token file), runs the server
#                       with --backend ray (one actor per worker, never spanning hosts)
#   --api-key-file F    the key clients must send (Authorization: Bearer KEY); default: a random one
#                       generated once in ~/.local/state/tropical_jax/api_key
#   --health-timeout S  seconds to wait for /health
#
# The server listens on every interface and requires the key; Ray (--hosts) binds the private
# address and requires its token: keep its ports closed to the outside too (docs/startup.md).
# The server runs under serve/supervise.sh (restarts it if it dies; pid and log in
# ~/.local/state/tropical_jax). Stop it with stop.sh. DRY_RUN=1 prints the commands instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/gpu/gpu.sh
source "$here/gpu.sh"

model='' convert='' dtype=bfloat16 cluster='' policy='' port=8000 hosts=1 health_timeout=1800 key_file=$API_KEY_FILE
layout_args=() extra=()
while (($#)); do
  case $1 in
    --model) need_value "$@"; model=$2; shift 2 ;;
    --convert) need_value "$@"; convert=$2; shift 2 ;;
    --dtype) need_value "$@"; dtype=$2; shift 2 ;;
    --cluster) need_value "$@"; cluster=$2; shift 2 ;;
    --tp) need_value "$@"; need_int "$@"; layout_args+=(--tp "$2"); shift 2 ;;
    --roles) need_value "$@"; layout_args+=(--roles "$2"); shift 2 ;;
    --policy) need_value "$@"; policy=$2; shift 2 ;;
    --port) need_value "$@"; need_int "$@"; port=$2; shift 2 ;;
    --hosts) need_value "$@"; need_int "$@"; hosts=$2; shift 2 ;;
    --health-timeout) need_value "$@"; need_int "$@"; health_timeout=$2; shift 2 ;;
    --api-key-file) need_value "$@"; key_file=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -z $convert || -n $model ]] || die "--convert HF_DIR needs --model DIR (where the converted checkpoint goes)"
[[ -z $convert || -d $convert ]] || die "--convert $convert: no such directory"
[[ -n $convert || -z $model || -d $model ]] || die "--model $model: no such directory"
[[ $dtype == bfloat16 || $dtype == float32 ]] || die "--dtype must be bfloat16 or float32, got '$dtype'"
[[ $key_file == "$API_KEY_FILE" || -s $key_file ]] || die "--api-key-file $key_file: no such file, or empty"
if [[ -f $PIDFILE ]] && kill -0 "$(<"$PIDFILE")" 2>/dev/null && ! is_dry_run; then
  die "a server is already running (supervisor pid $(<"$PIDFILE")); stop it with serve/gpu/stop.sh"
fi

read_gpus
weights=${convert:-$model}
if [[ -z $cluster ]]; then
  [[ -n $weights ]] && layout_args+=(--model-dir "$weights")
  load_layout --chips $((GPU_COUNT * hosts)) --chips-per-host "$GPU_COUNT" --platform gpu \
    --chip-gib "$(awk -v m="$GPU_MEMORY_MIB" 'BEGIN { print m / 1024 }')" ${layout_args[@]+"${layout_args[@]}"}
  cluster=${LAYOUT_CLUSTER}
fi
log "$GPU_COUNT GPU(s) of $GPU_MEMORY_MIB MiB on each of $hosts host(s): cluster $cluster"

if [[ -n $convert ]]; then
  run "$PYTHON" -m tropical_jax.checkpoint convert "$convert" "$model" --dtype "$dtype"
fi

ip=$(host_ip)
multi_host=$((hosts > 1 ? 1 : 0))
server=("$(command -v "$PYTHON")" -m tropical_jax.serve)  # this very interpreter (venv), whatever PATH the supervisor has
if ((multi_host)); then
  [[ -n $ip ]] || die "cannot find this host's private address (hostname -I) for the Ray head"
  new_secret "$RAY_TOKEN_FILE"
  ray_auth "$RAY_TOKEN_FILE"
  run env "${RAY_AUTH[@]}" ray start --head --node-ip-address="$ip" --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --disable-usage-stats
  echo "on each of the other $((hosts - 1)) host(s): copy $RAY_TOKEN_FILE there (mode 600, e.g. scp), then"
  echo "  serve/gpu/join.sh --address $ip:$RAY_PORT --token-file PATH_OF_THE_COPY"
  total=$((GPU_COUNT * hosts))
  wait_until 1800 "Ray to see $total GPUs" run env "${RAY_AUTH[@]}" "$PYTHON" -c "import ray, sys; \
ray.init(address='auto', logging_level='error'); sys.exit(ray.cluster_resources().get('GPU', 0) < $total)"
  server=(env JAX_PLATFORMS=cpu "${RAY_AUTH[@]}" "${server[@]}")  # the driver schedules; the GPUs belong to the actors
fi

[[ $key_file != "$API_KEY_FILE" ]] || new_secret "$key_file"
serve_args "$port" "$cluster" "$model" "$multi_host" "$key_file" ${policy:+--policy "$policy"} ${extra[@]+"${extra[@]}"}
run mkdir -p "$STATE_DIR"
run_background "$LOGFILE" "$PIDFILE" "$REPO_ROOT/serve/supervise.sh" -- "${server[@]}" "${SERVE_ARGS[@]}"
wait_until "$health_timeout" "the server's /health" run curl -sf "http://127.0.0.1:$port/health"
echo "endpoint: http://${ip:-127.0.0.1}:$port/v1  (log: $LOGFILE)"
echo "API key: in $key_file (clients send 'Authorization: Bearer KEY')"
