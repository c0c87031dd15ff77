#!/usr/bin/env bash
# Keep a command running: restart it whenever it exits, waiting 1, 2, 4 ... up to 60 s between
# tries (back to 1 s after it has run for 10 minutes). SIGTERM or SIGINT goes to the command (the
# server drains its in-flight requests) and ends the loop: no restart after a stop.
#
# Usage: serve/supervise.sh [--first-delay S] [--max-delay S] -- COMMAND [ARGS...]
#
# For hosts without systemd (the GPU scripts use it; TPU VMs use a systemd unit).
# DRY_RUN=1 prints the command instead of supervising it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=serve/lib.sh
source "$here/lib.sh"

first_delay=1 max_delay=60 healthy_after=600
while (($#)); do
  case $1 in
    --first-delay) need_value "$@"; [[ $2 =~ ^[0-9]+$ ]] || die "--first-delay takes whole seconds"; first_delay=$2; shift 2 ;;
    --max-delay) need_value "$@"; need_int "$@"; max_delay=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
(($#)) || die "no command to supervise (see --help)"
if is_dry_run; then show "$@"; exit 0; fi

child='' stopping=0
stop() {
  stopping=1
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null
  return 0
}
trap stop TERM INT

delay=$first_delay
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  status=0
  wait "$child" || status=$?
  # A trapped signal interrupts `wait`; wait again until the command has really finished (drained).
  while kill -0 "$child" 2>/dev/null; do
    status=0
    wait "$child" || status=$?
  done
  if ((stopping)); then
    log "stopped (the command exited with $status)"
    exit 0
  fi
  ((SECONDS - started < healthy_after)) || delay=$first_delay
  log "the command exited with $status; restarting in ${delay}s"
  sleep "$delay" &
  child=$!  # so a stop signal cuts the pause short
  wait "$child" || true
  ((stopping)) && exit 0
  delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
done
