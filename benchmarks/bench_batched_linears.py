"""The linears of one batched decoding step of GPT-2-124M (12 layers x c_attn, attn c_proj, c_fc, mlp c_proj, then
the tied head; random weights, fp32, 2 MB pages), at R rows: tinyllm's C panel kernel (`fused_decode.PanelLinear`,
what batched engines use) against oneDNN's GEMM on its blocked weight copy (what they used before, and still use
where no C compiler is found). All 497 MB of weights stream from memory each pass (the L3 holds 32 MB), as in a
real step. Each round runs both (order alternating) and samples the read bandwidth with torch's `sum`.

    .venv/bin/python benchmarks/bench_batched_linears.py --rows 1,8,16,32 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinyllm import fused_decode
from tinyllm.quantize import huge_page_copy, huge_page_zeros

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (N, K): out, in


def build(rows: int) -> list[tuple[fused_decode.PanelLinear, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each linear as (the C kernel on its panels, oneDNN's blocked weight, the bias, an input of `rows` rows)."""
    layers = []
    for n, k in SHAPES:
        w = huge_page_copy(torch.randn(n, k) * 0.02)
        panels = fused_decode.fill_panels(huge_page_zeros(torch.empty(fused_decode.panel_shape(w))), w)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        bias, x = torch.randn(n), torch.randn(rows, k)
        linear = fused_decode.PanelLinear(panels, bias, n)
        want = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        torch.testing.assert_close(linear(x), want, rtol=1e-4, atol=1e-4)
        layers.append((linear, packed, bias, x))
    return layers


@torch.inference_mode()
def measure(rows: int, rounds: int, big: torch.Tensor) -> None:
    layers = build(rows)

    def c_panels() -> None:
        for linear, _, _, x in layers:
            linear(x)

    def onednn() -> None:
        for _, packed, bias, x in layers:
            torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    times: dict[str, list[float]] = {"panels": [], "onednn": []}
    bandwidth = []
    for r in range(rounds):
        t = time.perf_counter()
        big.sum()
        bandwidth.append(big.nbytes / (time.perf_counter() - t) / 1e9)
        for name, fn in (("panels", c_panels), ("onednn", onednn))[:: 1 if r % 2 else -1]:
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    p, o = statistics.median(times["panels"]), statistics.median(times["onednn"])
    print(
        f"{rows:3d} rows: C panels {p:6.2f} ms, oneDNN packed {o:6.2f} ms ({o / p:.2f}x) per step's linears; "
        f"read bandwidth median {statistics.median(bandwidth):.1f} GB/s ({rounds} rounds, medians)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,32", help="rows per linear (sequences in the step)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    fused_decode.library()
    big = torch.randn(256 * 2**20 // 4)  # 256 MB for the bandwidth samples
    for rows in map(int, args.rows.split(",")):
        measure(rows, args.rounds, big)


if __name__ == "__main__":
    main()
