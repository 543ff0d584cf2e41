#!/bin/sh
# Used by the Dockerfile's builder stage: put the model the image serves into OUT/best.
#
#   build-checkpoint.sh SUPPLIED_DIR OUT_DIR
#
# SUPPLIED_DIR (docker/checkpoint/ of the build context) is used when it, or one directory in it, is a
# checkpoint or a run directory with best/ or last/; otherwise `tinyllm train` runs for $TRAIN_MINUTES minutes ($TRAIN_ARGS
# added). Only the weights, config, metadata and the model's own tokenizer (a trained BPE travels with its
# checkpoint) are copied: no optimizer or training state. The copy is loaded, tokenizer included, before the
# build goes on.
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
files=$(python -c "from tinyllm.tokenizer import RANKS_FILE, TOKENIZER_JSON; print(RANKS_FILE, TOKENIZER_JSON)")
for f in config.json model.safetensors meta.json $files; do
    if [ -f "$found/$f" ]; then cp "$found/$f" "$out/best/$f"; fi
done
# Loaded with a TINYLLM_HOME holding only the assets, as the final image's does: what it serves must not need
# the builder's other caches (trained tokenizers, prepared data).
home=$(mktemp -d)
ln -s "${TINYLLM_HOME:-$HOME/.cache/tinyllm}/assets" "$home/assets"
TINYLLM_HOME=$home python - "$out/best" <<'PY'
import sys
from tinyllm.checkpoint import load_checkpoint
c = load_checkpoint(sys.argv[1])
tok = c.tokenizer()
print("model ready:", c.path, "tokenizer:", tok.name, tok.vocab_size, "tokens")
PY
rm -rf "$home"
rm -rf /tmp/run
