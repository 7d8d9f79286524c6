#!/usr/bin/env bash
# Sourced by gpu_check.sh and gpu_budget.sh. Sets their defaults (REPO, PY, DEVICE, WHEELS, SITE), and
# gpu_env_setup TAG: on a bare GPU machine, install slimsearch's dependencies from the wheels in $WHEELS into $SITE
# (see gpu_check.sh's header for how to fetch them), then put this checkout's code first on PYTHONPATH: a folder
# of links maps slimsearch.core, .spaces, .evaluators and .search onto the repository's top-level folders
# (pyproject's package-dir).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEVICE=cuda
WHEELS="$REPO/.whl"
SITE="${SLIMSEARCH_SITE:-/tmp/site}"

gpu_env_setup() {
  local TAG="$1"
  if [[ "$DEVICE" != cpu ]]; then
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
      echo "[$TAG] installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
      echo "[$TAG] no wheels in $WHEELS: using the packages this Python has"
    fi
  fi

  # This checkout's code, whatever else is installed: links map the package onto the repository's folders.
  SHIM="$(mktemp -d)/pkg"
  mkdir -p "$SHIM/slimsearch"
  ln -s "$REPO"/slimsearch/*.py "$SHIM/slimsearch/"
  for room in core spaces evaluators search; do ln -s "$REPO/$room" "$SHIM/slimsearch/$room"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import optuna, tensorly, torch_pruning, slimsearch.core.device, slimsearch.search.cli" || {
    echo "[$TAG] error: missing packages (see the wheels note at the top of $0)" >&2
    exit 2
  }
}
