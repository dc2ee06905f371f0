#!/usr/bin/env bash
# medflare setup: creates .venv, installs the dependencies, copies custom/medflare into every job,
# then runs the default FedAvg job in the FLARE simulator (skip that with --no-run).
#
#   bash setup.sh            # install + run jobs/fedavg on the built-in 3-site benchmark (a few minutes on CPU)
#   bash setup.sh --no-run   # install only
#
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"

run_demo=1
for arg in "$@"; do
  case "$arg" in
    --no-run) run_demo=0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python tools/sync_jobs.py

if [ "$run_demo" = 1 ]; then
  echo "Running jobs/fedavg in the FLARE simulator (3 sites); workspace: workspaces/fedavg"
  .venv/bin/nvflare simulator jobs/fedavg -w "$PWD/workspaces/fedavg" -n 3 -t 3
  .venv/bin/python tools/report.py workspaces/fedavg
fi
