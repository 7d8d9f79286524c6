#!/usr/bin/env bash
# The GPU check: the quickstart, a 12-trial ResNet-20 study (finetune, 2 workers on one GPU) and an export with a
# 1-epoch fine-tune, all on CUDA; writes benchmarks/results/gpu_check.json (trials/h, s/trial, GPU name). About
# 3-5 minutes on one H100 (budget: 8).
#
#   benchmarks/gpu_check.sh                          # on a GPU machine: cuda, wheels from .whl/
#   benchmarks/gpu_check.sh --out "$OUT/gpu_check.json"
#   benchmarks/gpu_check.sh --device cpu --tiny      # toy scale on a CPU, no wheel install (the test runs this)
#
# A bare GPU machine with PyTorch lacks slimsearch's other dependencies. They travel as wheels in .whl/ beside
# the repository (never committed: `echo /.whl/ >> .git/info/exclude`); fetch them on a machine with pip, for the
# GPU machine's Python (3.12 here) and platform, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl optuna alembic colorlog sqlalchemy mako greenlet tensorly torch-pruning cmaes
# (ray too for backend ray; this check runs local workers, so it needs no Ray). They are installed with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl   and PYTHONPATH=/tmp/site.
# slimsearch itself runs from this checkout (even where another copy is installed): see gpu_env.sh.
set -euo pipefail

# shellcheck source=gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; ARGS+=(--device "$2"); shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; "$PY" "$REPO/benchmarks/gpu_check.py" --help; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ " ${ARGS[*]-} " == *" --device "* ]] || ARGS+=(--device "$DEVICE")

gpu_env_setup gpu_check
exec "$PY" "$REPO/benchmarks/gpu_check.py" "${ARGS[@]}"
