#!/usr/bin/env bash
# A/B of the default recipe's eager CUDA training, run on a GPU machine from the repository root: this tree
# ("new") against an older tree's src/ ("old", e.g. `git worktree add /tmp/old REV && cp -r /tmp/old/src
# .gpu/old_src`), in ABBA order, 30 s each, so a machine that warms up during the runs favours neither.
# Needs tinyllm's home in .gpu/home as benchmarks/gpu_check.sh does; writes logs to $OUT.
set -uo pipefail
OLD_SRC=${1:-$PWD/.gpu/old_src}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export TINYLLM_HOME=/tmp/tlhome PYTHONUNBUFFERED=1
mkdir -p $TINYLLM_HOME && cp -r .gpu/home/. $TINYLLM_HOME/
for v_i in old:1 new:1 new:2 old:2; do
  v=${v_i%:*} i=${v_i#*:}
  src=$PWD/src; [ "$v" = old ] && src=$OLD_SRC
  PYTHONPATH=$src timeout 120 python3 -m tinyllm train --max-minutes 0.5 --device cuda --run-dir /tmp/ab-$v-$i \
    --no-progress >"$OUT/ab-$v-$i.log" 2>&1
  echo "$v $i: $(tail -1 "$OUT/ab-$v-$i.log" | cut -c1-120)"
done
