#!/bin/sh
# Used by the Dockerfile's builder stage: put the model the image serves into OUT/best.
#
#   build-checkpoint.sh SUPPLIED_DIR OUT_DIR
#
# SUPPLIED_DIR (docker/checkpoint/ of the build context) is used when it, or one directory in it, is a
# checkpoint or a run directory with best/ or last/; otherwise `tinyllm train` runs for $TRAIN_MINUTES minutes ($TRAIN_ARGS
# added). Only config.json, model.safetensors and meta.json are copied: no optimizer or training state.
set -eu
supplied=$1
out=$2

found=$(python - "$supplied" <<'PY'
import sys
from pathlib import Path
from tinyllm.checkpoint import find_checkpoint
root = Path(sys.argv[1])
candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
print(next((str(c) for c in map(find_checkpoint, candidates) if c is not None), ""))
PY
)

if [ -n "$found" ]; then
    echo "using the supplied checkpoint $found"
else
    echo "no checkpoint in $supplied: training for ${TRAIN_MINUTES:-2} minutes"
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
    tinyllm train --max-minutes "${TRAIN_MINUTES:-2}" --run-dir /tmp/run ${TRAIN_ARGS:-}
    found=$(python -c "from tinyllm.checkpoint import find_checkpoint; print(find_checkpoint('/tmp/run') or '')")
    [ -n "$found" ] || { echo "training wrote no checkpoint under /tmp/run" >&2; exit 1; }
fi

mkdir -p "$out/best"
for f in config.json model.safetensors meta.json; do
    if [ -f "$found/$f" ]; then cp "$found/$f" "$out/best/$f"; fi
done
python -c "from tinyllm.checkpoint import load_checkpoint; c = load_checkpoint('$out/best'); print('model ready:', c.path)"
rm -rf /tmp/run
