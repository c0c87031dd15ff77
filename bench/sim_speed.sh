#!/bin/bash
# CPU seconds (user + sys, imports included) and wall seconds of simulator commands, in this checkout
# and, given one, in another (before a change), alternating so both see the same machine load:
#     bench/sim_speed.sh [OTHER_CHECKOUT]
# Goodput searches run in one process (--jobs 1, where the checkout has the option) so that CPU counts
# all their work; the last two, searches with --jobs 2 (the default on 2 cores), run only where --jobs
# exists: their worker processes are not this shell's children, so only their wall time means something.
# Prints: checkout | command | CPU s | wall s | attainment rejected {policy: goodput}
RUN="python -m tropical_jax.sim run --workload mooncake-conversation --profile a100-internlm2.5-20b-tp2 --max-input-len 32768 --json"
GOODPUT="python -m tropical_jax.sim goodput --workload mooncake-conversation --profile a100-internlm2.5-20b-tp2 --max-input-len 32768 --rate-lo 0.45 --rate-hi 1.0 --json"
CMDS=(
"$RUN --cluster 2C --policy colocated --rate 1.2 --shed"
"$RUN --cluster 2C --policy colocated --rate 0.6"
"$RUN --cluster 1P1D --policy disaggregated --rate 0.7"
"$RUN --cluster 1P1M --policy tropical --rate 0.8"
"$RUN --cluster 1P1M --policy planned --rate 0.9"
"$GOODPUT --policies disaggregated"
"$GOODPUT --policies planned"
"$GOODPUT --policies planned --early-stop"
"$GOODPUT --policies planned --jobs 2"
"$GOODPUT --policies planned --early-stop --jobs 2"
)
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp)
for c in "${CMDS[@]}"; do
  for d in ${1:+"$1"} "$here"; do
    has_jobs=$(grep -c -- '"--jobs"' "$d/tropical_jax/sim/cli.py")
    cmd=$c
    if [[ $c == *"--jobs"* ]]; then
      [[ $has_jobs == 0 ]] && continue
    elif [[ $c == *" goodput "* && $has_jobs != 0 ]]; then
      cmd="$c --jobs 1"
    fi
    (cd "$d" && /usr/bin/time -f "%U %S %e" -o "$out.t" env PYTHONPATH="$d" $cmd > "$out" 2>/dev/null)
    echo "$d | $c | $(awk '{print $1 + $2 " | " $3}' "$out.t") | $(python -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(d.get('attainment'), d.get('rejected'), {k: v['goodput'] for k, v in d.get('policies', {}).items()})" "$out")"
  done
done
rm -f "$out" "$out.t"
