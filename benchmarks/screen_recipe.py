"""Screen one variant of the training recipe: train it, then score it on the held-out works.

    # two variants side by side, one thread each, so both get a core and the same conditions:
    .venv/bin/python benchmarks/screen_recipe.py --threads 1 --set max_minutes=5 --set tokenizer=bpe:4096 &
    .venv/bin/python benchmarks/screen_recipe.py --threads 1 --set max_minutes=5 --set tokenizer=bpe:4096 \
        --model n_layer=2 &

`--set FIELD=VALUE` overrides a `TrainConfig` field of the default recipe (values are JSON, else strings);
`--model FIELD=VALUE` changes the default preset's shape. Prints one JSON line: steps, tokens/s, the
training loop's last validation bpb ("loop_bpb") and the sliding-window bpb on the whole held-out split
("bpb", the number the quality race is scored by). How the default recipe was chosen: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def _pairs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainConfig field")
    parser.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE", help="a ModelConfig field")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--run-dir", help="where the run goes (default: a temporary directory)")
    args = parser.parse_args(argv)

    import torch

    from tinyllm.checkpoint import find_checkpoint, load_checkpoint
    from tinyllm.config import PRESETS
    from tinyllm.evaluate import evaluate_model, training_heldout
    from tinyllm.train import default_config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or str(Path(tmp) / "run")
        overrides = _pairs(args.set)
        if args.model:
            overrides["model"] = dataclasses.replace(PRESETS["default"], **_pairs(args.model))
            overrides.setdefault("tokenizer", "bpe:4096")  # an explicit shape would otherwise default to GPT-2's
        config = default_config(run_dir=run_dir, **{"max_minutes": 10.0, "overwrite": True, **overrides})
        result = train(config, progress=False)
        loaded = load_checkpoint(find_checkpoint(run_dir), device="cpu")
        score = evaluate_model(loaded.model, data=training_heldout(run_dir), tokenizer=loaded.tokenizer())
    summary = {
        "set": _pairs(args.set),
        "model": _pairs(args.model),
        "threads": torch.get_num_threads(),
        "steps": result.steps,
        "tokens_per_s": round(result.tokens_per_second),
        "loop_bpb": round(result.val_bpb, 4) if result.val_bpb is not None else None,
        "bpb": round(score.bits_per_byte, 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
