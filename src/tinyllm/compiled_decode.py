"""A batch-1 decode step compiled by `torch.compile` (inductor): one graph for every layer and the head.

Decoding one sequence is memory-bound: each token reads every weight once. Eagerly, each linear is its own
oneDNN call (a thread fork/join, an opaque kernel) and each layer costs Python dispatch. Compiled, the whole
step is one C++ function of ~4 parallel regions in which a one-row linear is a multiply-and-sum over the
weight (`OneDNNLinear.forward` under compilation) that inductor turns into a streaming reduction, fused
with what computes its input; attention is plain math on the cached keys. Same fp32 weights, same math in
another summation order: greedy ids equal the eager engine's (tested), logits to ~1e-5.

It needs a C++ compiler and torch's headers at run time (inductor writes and builds C++). The first compile
takes 20-60 s on 2 cores; later processes reuse inductor's on-disk cache. `unavailable()` says why it cannot
run here (then the engine decodes eagerly). Batched steps stay eager: a multiply-and-sum would re-read each
weight once per row, where oneDNN's packed GEMM reads it once.

Shapes: C channels, V vocabulary, H heads, S cache positions, D head size.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import shutil
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch

from tinyllm.kv_cache import KVCache

if TYPE_CHECKING:
    from tinyllm.model import GPT

logger = logging.getLogger(__name__)

# Inductor options for this graph. Realize a pointwise result (the LayerNorm feeding a linear) instead of
# recomputing it inside the linear's reduction loop once per output row (newer torch names the CPU threshold
# `realize_cpu_opcount_threshold`, older torch only has the generic one). No pattern matching: it would turn
# the attention math back into an SDPA call, an extern kernel per layer. No size asserts: ~190 Python checks
# per call. The C++ wrapper: the ~180 intermediate buffers are allocated and freed in C++ instead of Python
# (a call spent ~760 us outside the kernel, ~410 us with it: +3% on a ~10 ms step, alternating A/B). Options
# this torch does not know are left out. Measured on GPT-2-124M here, the step alone: 84% -> 89-90% of the
# bandwidth roofline with the options before the C++ wrapper (host at ~35 GB/s); see BENCHMARKS.md.
INDUCTOR_OPTIONS: dict[str, object] = {
    "cpp_wrapper": True,
    "realize_cpu_opcount_threshold": 2,
    "realize_opcount_threshold": 2,
    "pattern_matcher": False,
    "size_asserts": False,
}
_KEYS = itertools.count()
_STEPS: WeakKeyDictionary[torch.nn.Module, Callable[..., torch.Tensor]] = WeakKeyDictionary()


def unavailable(device: torch.device, model: torch.nn.Module | None = None) -> str | None:
    """Why a compiled decode step cannot run here (for `model`, when given), or None when it can."""
    if device.type != "cpu":
        return f"compiled decoding is built for CPU decoding; this model is on {device.type}"
    if model is not None and any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        return "int8-dynamic layers (torch.ao's quantized Linear) do not compile; int8 or bfloat16 do"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        return "no C++ compiler found (inductor builds C++ at run time; install g++)"
    spec = importlib.util.find_spec("torch")
    roots = spec.submodule_search_locations if spec else None
    if not roots or not (Path(roots[0]) / "include" / "ATen").is_dir():
        return "torch's C++ headers are missing (torch/include), so inductor cannot build its kernels"
    return None


def _forward(model: GPT, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, cache_len: int) -> torch.Tensor:
    h = model.hidden_states(idx, input_pos=pos, kv_cache=cache, cache_len=cache_len)  # (1, 1, C)
    return model.lm_head(h[:, -1])  # (1, V)


def _compiled_for(model: GPT) -> Callable[..., torch.Tensor]:
    """The compiled step of one model object, shared by its engines.

    Dynamo's guards are skipped (checking ~150 parameters and the cache costs ~0.3 ms a call, 2% of a step), so
    nothing would tell two models apart in one dynamo cache: each model gets its own copy of the function's
    code object, hence its own cache. What the guards would check holds by construction: the engine always
    calls with this model, a one-slot cache of its layout (any length: the sizes are symbolic) and under
    inference mode. Do not restructure or re-prepare the model after compiling it.
    """
    step = _STEPS.get(model)
    if step is None:
        code = _forward.__code__.replace(co_name=f"_forward_{next(_KEYS)}")
        fn = types.FunctionType(code, _forward.__globals__, code.co_name)
        options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe, **_known(INDUCTOR_OPTIONS)}
        step = _STEPS[model] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    return step


def _known(options: dict[str, object]) -> dict[str, object]:
    """The inductor options this torch has; where both thresholds exist only the CPU one is set."""
    import torch._inductor.config as inductor_config

    known = {k: v for k, v in options.items() if hasattr(inductor_config, k.split(".")[0])}
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):
        known.pop("realize_opcount_threshold", None)
    return known


class CompiledDecoder:
    """`decoder(idx, pos, cache, cache_len)` -> logits (1, V) for one token of one sequence.

    Args:
        model: the GPT the engine serves (after `prepare_for_inference`: its one-row linears compile to
            streaming reductions).

    Call `warm_up(like)` once (it compiles; seconds to a minute) before the first real call, with the
    engine's cache: a scratch cache of the same shape is written, never the engine's.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self._step = _compiled_for(model)
        self.compile_s: float | None = None

    def warm_up(self, like: KVCache) -> None:
        """Compile (or load from inductor's cache) on a scratch cache shaped like one of `like`'s slots."""
        scratch = KVCache.__new__(KVCache)  # made outside inference mode, as the engine's cache is
        scratch.k = [torch.zeros_like(k[:1]) for k in like.k]  # (1, H, S, D) per layer
        scratch.v = [torch.zeros_like(v[:1]) for v in like.v]
        scratch.max_seq_len, scratch.batch_size = like.max_seq_len, 1
        device = like.k[0].device
        t = time.perf_counter()
        with torch.inference_mode():
            for n in (2, 3):  # not 1: dynamo would specialize the graph to a length of 1; then one compiled run
                idx = torch.zeros(1, 1, dtype=torch.long, device=device)
                self._step(self.model, idx, torch.tensor([[n - 1]], device=device), scratch.view(slice(0, 1)), n)
        self.compile_s = time.perf_counter() - t
        logger.info("compiled the batch-1 decode step in %.1f s", self.compile_s)

    def __call__(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, cache_len: int) -> torch.Tensor:
        """Logits (1, V) of token `idx` (1, 1) at position `pos` (1, 1) = cache_len - 1 of a one-slot `cache`."""
        return self._step(self.model, idx, pos, cache, cache_len)
