# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by the GPU scripts (source it after ../lib.sh): where the server's pid and log live, the
# Ray port, and what nvidia-smi says about this host's GPUs.

STATE_DIR=${TROPICAL_STATE_DIR:-$HOME/.local/state/tropical_jax}
PIDFILE=$STATE_DIR/serve.pid   # the supervisor's pid (serve/supervise.sh)
LOGFILE=$STATE_DIR/serve.log
RAY_PORT=${RAY_PORT:-6379}

# GPU_COUNT and GPU_MEMORY_MIB (of the first GPU) from nvidia-smi; a clear error without a driver.
GPU_COUNT=0 GPU_MEMORY_MIB=0
read_gpus() {
  local out
  out=$(query nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits) \
    || die "nvidia-smi failed: is the NVIDIA driver installed?"
  GPU_COUNT=$(grep -c '[0-9]' <<<"$out" || true)
  ((GPU_COUNT > 0)) || die "nvidia-smi lists no GPUs"
  GPU_MEMORY_MIB=$(awk -F, 'NR == 1 { print int($1) }' <<<"$out")
}

# This host's first address (for the endpoint and for the other hosts to join Ray).
host_ip() { hostname -I 2>/dev/null | awk '{ print $1 }'; }
