#!/usr/bin/env bash
# Stop the server started by start.sh (it drains in-flight requests first), and Ray with --ray.
#
# Usage: serve/gpu/stop.sh [--ray] [--timeout 90]
#
#   --ray        also stop Ray on this host (run it on every host of a multi-host cluster)
#   --timeout S  seconds to wait for the drain before giving up (default 90)
#
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/../lib.sh"
# shellcheck source=serve/gpu/gpu.sh
source "$here/gpu.sh"

ray=0 timeout=90
while (($#)); do
  case $1 in
    --ray) ray=1; shift ;;
    --timeout) need_value "$@"; need_int "$@"; timeout=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [[ -f $PIDFILE ]]; then
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] || die "$PIDFILE does not hold a pid"
  # SIGTERM to the supervisor: it passes it to the server, which drains, and restarts nothing.
  run kill -TERM "$pid" || log "no process $pid (already stopped)"
  if ! is_dry_run; then
    deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
      ((SECONDS < deadline)) || die "the server (supervisor $pid) still runs after ${timeout}s"
      sleep 1
    done
  fi
  run rm -f "$PIDFILE"
else
  log "no server started by start.sh here ($PIDFILE missing)"
fi
if ((ray)); then run ray stop; fi
