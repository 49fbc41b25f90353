#!/usr/bin/env bash
# The GPU check (`bash run.sh gpu-check`), for a CUDA machine with torch, transformers and peft
# preinstalled and no network. Nothing is downloaded: the few packages dropinf and its tests need
# beyond those (crc32c for the store's checksums; pytest) come as wheels in benchmarks/gpu/wheels
# and go to a temporary folder on PYTHONPATH. It runs, within 8 minutes (each step has a cap):
#   1. the tests marked `cuda` (tests/test_cuda.py): fused capture against the loop in fp32 and
#      bf16 autocast, the capture-only backward bit for bit, scorer/store on CUDA = CPU, torchrun
#      with nccl on one GPU;
#   2. benchmarks/capture_overhead.py --device cuda (the MLP and ResNet-18: the other two models
#      ship as packages too large to carry);
#   3. benchmarks/score_scale.py --device cuda at 250k rows;
#   4. benchmarks/billion.py --device cuda: the Pythia-1.4B shape, plain vs Dropout r=512 vs LoGra
#      64x64 into a store, then fit and top-k (tokens/s and peak GPU memory).
# Everything it prints also goes to ${OUT:-.}/gpu-check.log. Exit status: the tests' status.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
LOG="${OUT:-.}/gpu-check.log"
SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
"$PY" -c "import crc32c" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
    benchmarks/gpu/wheels/crc32c-*-"$tag"-*.whl
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
    benchmarks/gpu/wheels/{pytest,pluggy,iniconfig,packaging}-*.whl
export PYTHONPATH="$SITE:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
  echo "== 1. tests marked cuda"
  timeout 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider; status=$?
  echo "== 2. capture overhead (cuda)"
  timeout 90 "$PY" benchmarks/capture_overhead.py --device cuda --models mlp,resnet18 --threads 8
  echo "== 3. scoring at scale (cuda)"
  timeout 80 "$PY" benchmarks/score_scale.py --device cuda --sizes 250000 --threads 8
  echo "== 4. Pythia-1.4B shape (cuda)"
  timeout 150 "$PY" benchmarks/billion.py --device cuda --batches 8 --threads 8
  echo "== tests exit status: $status"
  exit $status
} 2>&1 | tee "$LOG"
