#!/usr/bin/env bash
# The command line, end to end (run from the repository root after `make demo` or `make setup`).
set -euo pipefail
optistack passes                                   # every pass, available here or not (and why)
optistack run --model smollm2 --pipeline "int8-weight" --json out.json --plot out.png --quick
optistack report out.json --format md              # re-render a saved report
