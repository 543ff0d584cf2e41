#!/usr/bin/env bash
# The CUDA checks, run on a GPU machine from the repository root (no install: PYTHONPATH=src, the machine's torch).
# Needs tinyllm's home (assets, and to skip re-preparing: data and tokenizers) in .gpu/home; writes logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TINYLLM_HOME=/tmp/tlhome PYTHONUNBUFFERED=1
mkdir -p $TINYLLM_HOME && cp -r .gpu/home/. $TINYLLM_HOME/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -p no:cacheprovider -o addopts="" tests/test_cuda.py -v 2>&1 | tee "$OUT/pytest.log" | tail -20
for mode in ${MODES:-eager compile}; do  # MODES=eager: the eager run alone
  flag=$([ $mode = compile ] && echo --compile)
  timeout 150 python3 -m tinyllm train --max-minutes 0.75 --device cuda $flag --run-dir /tmp/run-$mode \
    --no-progress >"$OUT/train-$mode.log" 2>&1
  tail -4 "$OUT/train-$mode.log"
  cp /tmp/run-$mode/metrics.jsonl "$OUT/metrics-$mode.jsonl"
done
