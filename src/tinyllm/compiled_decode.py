"""A batch-1 decode step compiled by `torch.compile` (inductor): one graph for every layer and the head.

The engine uses it for bfloat16 and int8-weight models, and for float32 where the C step of
`tinyllm.fused_decode` (faster: fewer phases a layer) cannot be built; `Engine(compile="inductor")` asks for it.

Decoding one sequence is memory-bound: each token reads every weight once. Eagerly, each linear is its own
oneDNN call (a thread fork/join, an opaque kernel) and each layer costs Python dispatch. Compiled, the whole
step is one C++ function of ~4 parallel regions in which a one-row linear is a multiply-and-sum over the
weight (`OneDNNLinear.forward` under compilation) that inductor turns into a streaming reduction, fused
with what computes its input; attention is plain math on the cached keys; the step also returns the argmax
(the greedy token) so the engine does not run one more op over the logits. Same fp32 weights, same math in
another summation order: greedy ids equal the eager engine's (tested), logits to ~1e-5. After warm-up, calls
skip dynamo's frame: the compiled graph is called with an argument list the decoder builds itself (see
`_Graph`), checked bit-equal with dynamo's call first.

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
_STEPS: WeakKeyDictionary[torch.nn.Module, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], _Graph]] = (
    WeakKeyDictionary()
)


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


def _forward(
    model: GPT, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, cache_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.hidden_states(idx, input_pos=pos, kv_cache=cache, cache_len=cache_len)  # (1, 1, C)
    logits = model.lm_head(h[:, -1])  # (1, V)
    return logits, logits.argmax(dim=-1)  # the greedy token (1,) too: inside the kernel, not a separate op


class _Graph:
    """What inductor built for one model's step, and how to call it without going through dynamo.

    Dynamo's frame around a call (gathering ~150 parameters from the module tree, its wrappers) costs ~0.3-0.4 ms
    a step, most of it in code and data gone cold while the kernel streamed the weights. The backend records
    the compiled function and where each of its inputs comes from (a parameter, a layer's cached keys or
    values, the token, the position, the cache length, a size), so `CompiledDecoder` can build the argument list
    itself. `recipe` is None when an input could not be placed (then calls go through dynamo).
    """

    def __init__(self) -> None:
        self.call_args: dict[str, object] | None = None  # the arguments of the call being compiled
        self.fn: Callable[..., list[torch.Tensor]] | None = None
        self.recipe: list[tuple[str, object]] | None = None

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches=_known(INDUCTOR_OPTIONS))
        self.fn, self.recipe = fn, _recipe(example_inputs, self.call_args) if self.call_args else None
        return fn


def _recipe(inputs: list[object], call: dict[str, object]) -> list[tuple[str, object]] | None:
    """Where each graph input comes from, by identity with the arguments of the call being compiled."""
    model, cache = call["model"], call["cache"]
    assert isinstance(model, torch.nn.Module) and isinstance(cache, KVCache)
    places: dict[int, tuple[str, object]] = {id(t): ("const", t) for t in (*model.parameters(), *model.buffers())}
    places.update({id(k): ("k", i) for i, k in enumerate(cache.k)})
    places.update({id(v): ("v", i) for i, v in enumerate(cache.v)})
    places.update({id(call["idx"]): ("idx", None), id(call["pos"]): ("pos", None)})
    recipe: list[tuple[str, object]] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            place = places.get(id(x))
        elif isinstance(x, (int, torch.SymInt)):
            value = int(x)
            place = ("cache_len", None) if value == call["cache_len"] else ("int", value)  # else a cache size
        else:
            place = None
        if place is None:
            return None
        recipe.append(place)
    return recipe


def _compiled_for(model: GPT) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], _Graph]:
    """The compiled step of one model object, shared by its engines, and what its backend recorded.

    Dynamo's guards are skipped (checking ~150 parameters and the cache costs ~0.3 ms a call, 2% of a step), so
    nothing would tell two models apart in one dynamo cache: each model gets its own copy of the function's
    code object, hence its own cache. What the guards would check holds by construction: the engine always
    calls with this model, a one-slot cache of its layout (any length: the sizes are symbolic) and under
    inference mode. Do not restructure or re-prepare the model after compiling it.
    """
    compiled = _STEPS.get(model)
    if compiled is None:
        code = _forward.__code__.replace(co_name=f"_forward_{next(_KEYS)}")
        fn = types.FunctionType(code, _forward.__globals__, code.co_name)
        graph = _Graph()
        options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        step = torch.compile(fn, dynamic=True, fullgraph=True, backend=graph.backend, options=options)
        compiled = _STEPS[model] = (step, graph)
    return compiled


def _known(options: dict[str, object]) -> dict[str, object]:
    """The inductor options this torch has; where both thresholds exist only the CPU one is set."""
    import torch._inductor.config as inductor_config

    known = {k: v for k, v in options.items() if hasattr(inductor_config, k.split(".")[0])}
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):
        known.pop("realize_opcount_threshold", None)
    return known


class CompiledDecoder:
    """`decoder(idx, pos, cache, cache_len)` -> (logits (1, V), greedy token (1,)) for one token of one sequence.

    Args:
        model: the GPT the engine serves (after `prepare_for_inference`: its one-row linears compile to
            streaming reductions).

    Call `warm_up(like)` once (it compiles; seconds to a minute) before the first real call, with the
    engine's cache: a scratch cache of the same shape is written, never the engine's.
    """

    kind = "inductor"

    def __init__(self, model: GPT) -> None:
        self.model = model
        self._step, self._graph = _compiled_for(model)
        self.compile_s: float | None = None
        self._shape: torch.Size | None = None  # the cache layout the direct call was checked on (None: not direct)
        self._args: dict[int, tuple[KVCache, list[object]]] = {}  # id(cache) -> (cache, argument list)
        self._ints: list[torch.Tensor] = []  # 0-d tensors 0..S for the integer inputs (no tensor made per call)
        self._positions: list[torch.Tensor] = []  # (1, 1) position tensors 0..S-1, for `position`
        self._at: dict[str, list[int]] = {}  # where the token, position and cache length go in the argument list

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
                pos = torch.tensor([[n - 1]], device=device)
                cache = scratch.view(slice(0, 1))
                self._graph.call_args = dict(model=self.model, idx=idx, pos=pos, cache=cache, cache_len=n)
                try:
                    expected = self._step(self.model, idx, pos, cache, n)
                finally:
                    self._graph.call_args = None
            self._check_direct(idx, pos, scratch, expected)
            self._positions = [torch.tensor([[n]], device=device) for n in range(like.max_seq_len)]
        self.compile_s = time.perf_counter() - t
        logger.info(
            "compiled the batch-1 decode step in %.1f s (%s)", self.compile_s, "direct" if self.direct else "dynamo"
        )

    @property
    def direct(self) -> bool:
        """Whether calls skip dynamo (after warm-up checked the direct call on this cache layout)."""
        return self._shape is not None

    def position(self, n: int) -> torch.Tensor:
        """Position `n` as the (1, 1) tensor a call takes (made once: a new tensor costs ~50 us a step, cold)."""
        return self._positions[n] if 0 <= n < len(self._positions) else torch.tensor([[n]])

    def _check_direct(
        self, idx: torch.Tensor, pos: torch.Tensor, scratch: KVCache, expected: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Turn the direct call on if it gives what dynamo's call gave (the last warm-up step, again)."""
        recipe = self._graph.recipe
        if self._graph.fn is None or recipe is None:
            logger.info("calls to the compiled step go through dynamo: its inputs could not all be placed")
            return
        self._at = {kind: [i for i, (k, _) in enumerate(recipe) if k == kind] for kind in ("idx", "pos", "cache_len")}
        if len(self._at["idx"]) != 1 or len(self._at["pos"]) != 1:
            logger.info("calls to the compiled step go through dynamo: no single token and position input")
            return
        self._shape = scratch.k[0].shape
        self._ints = [torch.tensor(n) for n in range(scratch.max_seq_len + 1)]
        try:
            again = self._call_direct(idx, pos, scratch, int(pos) + 1)
            same = all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))
        except Exception as exc:  # a torch whose compiled functions take other arguments
            logger.info("calls to the compiled step go through dynamo: the direct call failed: %s", exc)
            same = False
        else:
            if not same:
                logger.info("calls to the compiled step go through dynamo: the direct call gave other logits")
        self._args.clear()  # the scratch cache's entry
        if not same:
            self._shape = None

    def _call_direct(
        self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, cache_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._args.get(id(cache))
        if entry is None or entry[0] is not cache:
            if len(self._args) > 64:  # callers that make a new view per call
                self._args.clear()
            entry = self._args[id(cache)] = (cache, self._arguments(cache))
        args = list(entry[1])
        args[self._at["idx"][0]], args[self._at["pos"][0]] = idx, pos
        for i in self._at["cache_len"]:
            args[i] = self._ints[cache_len]
        assert self._graph.fn is not None
        logits, token = self._graph.fn(*args)
        return logits, token

    def _arguments(self, cache: KVCache) -> list[object]:
        """The graph's inputs for `cache`, with the token, position and length left to fill in."""
        assert self._graph.recipe is not None
        args: list[object] = []
        for kind, what in self._graph.recipe:
            if kind == "const":
                args.append(what)
            elif kind in ("k", "v"):
                args.append((cache.k if kind == "k" else cache.v)[what])  # type: ignore[index]
            elif kind == "int":
                args.append(self._ints[what] if 0 <= what < len(self._ints) else what)  # type: ignore[operator,index]
            else:
                args.append(None)  # the token, position or length: filled in per call
        return args

    def decode(self, token: int, cache: KVCache, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (1, V) of `token` at position `length - 1` of a one-slot `cache`, and their argmax (1,)."""
        idx = torch.tensor([[token]], dtype=torch.long, device=cache.k[0].device)  # (1, 1)
        return self(idx, self.position(length - 1), cache, length)

    def __call__(
        self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, cache_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (1, V) of token `idx` (1, 1) at position `pos` (1, 1) = cache_len - 1 of a one-slot `cache`, and
        their argmax (1,)."""
        if self.direct and cache.k[0].shape == self._shape:
            return self._call_direct(idx, pos, cache, cache_len)
        return self._step(self.model, idx, pos, cache, cache_len)
