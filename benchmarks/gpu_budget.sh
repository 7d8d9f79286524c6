#!/usr/bin/env bash
# The budget protocol's [gpu] cells on one GPU (issue 22): bench_budget.py --device cuda, sized by
# gpu_budget_estimate.py to fit 9 minutes of one H100. Rows land in $OUT/budget/v<version>/<cell>-gpu/; copy them
# into benchmarks/results/budget/ on the machine that holds the git history, then rebuild the summary there.
#
#   benchmarks/gpu_budget.sh --expect-protocol BLOB [bench_budget.py options]    # on a GPU machine
#   benchmarks/gpu_budget.sh --device cpu --tiny --gpu-protocol --pilot gpu-toy   # toy scale on a CPU
#
# The device copy has no git history, so the protocol is named by its committed blob id (BLOB, from
# `git rev-parse HEAD:benchmarks/protocol.toml` here) and the code by $SLIMSEARCH_CODE_REV. The CIFAR-10 archive and
# checkpoints are read from $SLIMSEARCH_SHARED (default: the checkout's shared/, e.g. an ignored link to ../shared
# whose files travel as carried paths). Dependencies: as gpu_check.sh (wheels in .whl/), plus pillow for the JPEGs.
set -euo pipefail

# shellcheck source=gpu_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
SHARED="${SLIMSEARCH_SHARED:-$REPO/shared}"
OUTDIR="${OUT:-$REPO/benchmarks/results}"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

gpu_env_setup gpu_budget
"$PY" -c "import PIL" || { echo "[gpu_budget] error: pillow is missing (add its wheel to $WHEELS)" >&2; exit 2; }
[[ "$DEVICE" == cpu ]] || "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
  echo "[gpu_budget] error: no CUDA device" >&2
  exit 2
}
exec "$PY" "$REPO/benchmarks/bench_budget.py" --device "$DEVICE" --shared "$SHARED" --out "$OUTDIR/budget" \
  --threads "$(nproc)" "${ARGS[@]}"
