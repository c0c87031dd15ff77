#!/usr/bin/env bash
# Start the tropical_jax server on a TPU VM or slice under systemd, wait for /health, print the endpoint.
#
# Usage: serve/tpu_vm/start.sh --project P --zone Z --accelerator-type TYPE [--name N] [--model PATH]
#            [--cluster LAYOUT | --tp N] [--roles PM|PD|C] [--policy P] [--port 8000]
#            [--api-key-file F] [--health-timeout 1800] [-- more server flags]
#
#   --model PATH        checkpoint on the workers (e.g. models/NAME from checkpoint.sh; default: the
#                       embedded model)
#   --cluster LAYOUT    override the layout chosen from the chip count (v5e-8: P:tp4,M:tp4)
#   --tp N, --roles R   or let the chooser pick with this TP size / role split
#   --policy P          tropical (default for P+M), planned, disaggregated, ...
#   --health-timeout S  seconds to wait for /health (loading and compiling a large model takes minutes)
#   --api-key-file F    the key clients must send (Authorization: Bearer KEY); default: a random one
#                       generated once in ~/.local/state/tropical_jax/tpu-NAME/api_key on this machine
#
# The server listens on every interface and requires the key (copied to the workers, mode 600, never
# on a command line). A multi-host slice's Ray binds worker 0's internal address and requires a token
# (Ray token authentication, generated beside the key): keep its ports closed to the outside too.
# One host: the server runs every worker in its process (--backend local). A multi-host slice: a Ray
# head on worker 0, `ray start --address` on the others, and the server (on worker 0) with --backend
# ray: one Ray actor per worker mesh, each confined to its host's chips (TROPICAL_JAX_DISTRIBUTED=host,
# see tropical_jax/cluster/distributed.py). systemd (unit tropical-serve) restarts the server if it dies.
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/tpu_vm/tpu.sh
source "$here/tpu.sh"

tpu_parse_args "$@"
model='' cluster='' policy='' port=8000 health_timeout=1800 extra=() key_file=''
set -- ${REST[@]+"${REST[@]}"}
while (($#)); do
  case $1 in
    --model) need_value "$@"; model=$2; shift 2 ;;
    --cluster) need_value "$@"; cluster=$2; shift 2 ;;
    --tp) need_value "$@"; need_int "$@"; LAYOUT_ARGS+=(--tp "$2"); shift 2 ;;
    --roles) need_value "$@"; LAYOUT_ARGS+=(--roles "$2"); shift 2 ;;
    --policy) need_value "$@"; policy=$2; shift 2 ;;
    --port) need_value "$@"; need_int "$@"; port=$2; shift 2 ;;
    --health-timeout) need_value "$@"; need_int "$@"; health_timeout=$2; shift 2 ;;
    --api-key-file) need_value "$@"; key_file=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
tpu_require_type
[[ -z $key_file || -s $key_file ]] || die "--api-key-file $key_file: no such file, or empty"
cluster=${cluster:-${LAYOUT_CLUSTER}}
hosts=${LAYOUT_HOSTS}
multi_host=$((hosts > 1 ? 1 : 0))
log "${LAYOUT_ACCELERATOR_TYPE}: ${LAYOUT_CHIPS} chips on $hosts host(s), cluster $cluster"

# The secrets, generated here once (restarts keep them), copied to every worker.
secrets=$(secrets_dir)
token_file=$secrets/ray_token
[[ -n $key_file ]] || { key_file=$secrets/api_key; new_secret "$key_file"; }
((multi_host)) && new_secret "$token_file"
tpu_ssh all "mkdir -p -m 700 $REMOTE_SECRETS"
tpu_gcloud scp "$key_file" "$TPU_NAME:$REMOTE_SECRETS/api_key" --worker=all
((multi_host)) && tpu_gcloud scp "$token_file" "$TPU_NAME:$REMOTE_SECRETS/ray_token" --worker=all

ray="$VENV/bin/ray"
if ((multi_host)); then
  head_ip=$(tpu_address ipAddress)
  ray_auth "\$HOME/$REMOTE_SECRETS/ray_token"
  # Every raylet (and so every worker actor it starts) confines its processes to their host's chips.
  # The head listens on worker 0's internal address, its dashboard on localhost only.
  tpu_ssh 0 "$ray stop >/dev/null 2>&1 || true
TROPICAL_JAX_DISTRIBUTED=host ${RAY_AUTH[*]} $ray start --head --node-ip-address=$head_ip --port=6379 \
--dashboard-host=127.0.0.1 --disable-usage-stats"
  tpu_ssh "$(seq -s, 1 $((hosts - 1)))" "$ray stop >/dev/null 2>&1 || true
TROPICAL_JAX_DISTRIBUTED=host ${RAY_AUTH[*]} $ray start --address=$head_ip:6379 --disable-usage-stats"
fi

serve_args "$port" "$cluster" "$model" "$multi_host" "$REMOTE_SECRETS/api_key" ${policy:+--policy "$policy"} \
  ${extra[@]+"${extra[@]}"}
exec_start="\$HOME/$VENV/bin/python -m tropical_jax.serve"
for word in "${SERVE_ARGS[@]}"; do exec_start+=" $(quote "$word")"; done
environment='Environment=PYTHONUNBUFFERED=1'  # log lines reach the journal as they happen
# The Ray driver schedules only (the chips belong to the actors), and needs Ray's token.
((multi_host)) && environment+=" JAX_PLATFORMS=cpu ${RAY_AUTH[*]}"
# Restart=always with no start limit: systemd brings the server back whenever it exits; SIGTERM
# (systemctl stop) lets it drain in-flight requests first (--drain-timeout, 60 s by default).
tpu_ssh 0 "set -euo pipefail
sudo tee /etc/systemd/system/$SERVICE.service >/dev/null <<UNIT
[Unit]
Description=tropical_jax server (python -m tropical_jax.serve)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
User=\$(id -un)
WorkingDirectory=\$HOME
$environment
ExecStart=$exec_start
Restart=always
RestartSec=10
TimeoutStopSec=90

[Install]
WantedBy=multi-user.target
UNIT
sudo systemctl daemon-reload
sudo systemctl enable $SERVICE
sudo systemctl restart $SERVICE"

wait_until "$health_timeout" "/health on worker 0" tpu_ssh 0 "curl -sf http://localhost:$port/health"
ip=$(tpu_address accessConfig.externalIp)
echo "API key: in $key_file (clients send 'Authorization: Bearer KEY')"
echo "endpoint: http://$ip:$port/v1  (open tcp:$port in the VPC firewall, or tunnel:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$TPU_ZONE --project=$TPU_PROJECT --worker=0 -- -L $port:localhost:$port)"
