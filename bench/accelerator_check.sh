#!/usr/bin/env bash
# The accelerator check (docs/hardware.md) from anywhere; every argument goes to python -m bench.accelerator_check.
PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec python -m bench.accelerator_check "$@"
