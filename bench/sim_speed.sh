#!/bin/bash
# CPU seconds (user + sys, imports included) of simulator commands, in this checkout and, given one,
# in another (before a change), alternating so both see the same machine load:
#     bench/sim_speed.sh [OTHER_CHECKOUT]
# Prints: checkout | command | CPU s | attainment rejected {policy: goodput}
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
)
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp)
for c in "${CMDS[@]}"; do
  for d in ${1:+"$1"} "$here"; do
    (cd "$d" && /usr/bin/time -f "%U %S" -o "$out.t" env PYTHONPATH="$d" $c > "$out" 2>/dev/null)
    echo "$d | $c | $(awk '{print $1 + $2}' "$out.t") | $(python -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(d.get('attainment'), d.get('rejected'), {k: v['goodput'] for k, v in d.get('policies', {}).items()})" "$out")"
  done
done
rm -f "$out" "$out.t"
