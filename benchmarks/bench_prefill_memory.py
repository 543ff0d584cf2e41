"""Resident memory and time of prefilling many prompt lengths, as a server sees them (GPT-2-124M shape,
random weights, prepared and packed as the engine prepares them).

    .venv/bin/python benchmarks/bench_prefill_memory.py               # oneDNN GEMMs padded to a few sizes
    .venv/bin/python benchmarks/bench_prefill_memory.py --unpadded    # every length its own oneDNN shape

oneDNN keeps memory for each GEMM shape it runs; `tinyllm.quantize.onednn_rows` bounds the shapes.
"""

from __future__ import annotations

import argparse
import json
import time


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unpadded", action="store_true", help="run every prompt length at its own size")
    parser.add_argument("--step", type=int, default=9, help="prompt lengths 17, 17+step, ... up to 1023 (9)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tinyllm import quantize
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT

    if args.unpadded:
        quantize.onednn_rows = lambda rows: rows
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)).eval()
    quantize.prepare_for_inference(model)
    quantize.pack_for_batches(model, 8)
    lengths = range(17, 1024, args.step)
    start, t0 = rss_mb(), time.perf_counter()
    with torch.inference_mode():
        for n in lengths:
            model.hidden_states(torch.randint(0, 50257, (1, n)))
    result = {
        "padded": not args.unpadded,
        "prompt_lengths": len(lengths),
        "rss_start_mb": start,
        "rss_end_mb": rss_mb(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
