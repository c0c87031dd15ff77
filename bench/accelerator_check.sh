#!/usr/bin/env bash
# The accelerator check (see docs/hardware.md); every argument goes to bench/accelerator_check.py.
exec python "$(dirname "$0")/accelerator_check.py" "$@"
