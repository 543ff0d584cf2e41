"""A batch-1 fp32 decode step written in C: every layer and the head in one OpenMP parallel region (and, from the
same library, the kernels of batched eager steps: `PanelLinear` for linears of a few rows, `DecodeAttention`).

Decoding one sequence reads every weight once per token, so a step is as fast as it streams the weights. The
step `torch.compile` builds (`tinyllm.compiled_decode`) splits a layer into ~17 phases with a barrier between
each. `csrc/decode_step.c` is the same math in 5 phases a layer (q/k/v, attention, projection, MLP in, MLP
out): each thread streams one contiguous run of rows of each matrix (two 8-lane accumulators), computes the
LayerNorms it needs itself, and takes half of what is left of another thread's run when done with its own.
It reads the model's own fp32 weights in place, except the MLP's second linear, whose copy in column blocks
(`column_blocks`: 113 MB for GPT-2-124M) it reads as rows as short as every other matrix's (a row of 4C floats
multiplies all 4C of the MLP's activations, more than L1 keeps beside the streamed weights), and writes the
engine's KV cache in place. Measured on GPT-2-124M here (BENCHMARKS.md, runs N): a median 97.6% of the
memory-bandwidth roofline at ~33 GB/s, 93.1% at ~60 GB/s (inductor's step: 84-90% and ~80%).

Same fp32 weights, same math in another summation order (like the compiled step): greedy ids equal the eager
engine's (tested), logits to ~1e-5, bit-equal for any thread count; `warm_up` checks one step against the
eager model before it is used. Built once per CPU model with the system C compiler (`$CC`, else
cc/gcc/clang; -O3 -march=native -fopenmp, under a second) into tinyllm's cache (`$TINYLLM_HOME/kernels`),
loaded with ctypes, which releases the GIL during the call. Where it cannot run (another dtype, no compiler, not
CPU) `unavailable` says why and the engine uses the compiled step or eager decoding. `decode_many` runs several
greedy steps in one call (the engine's bursts): Python between two steps runs cold, after the weights have
streamed through the caches.

Shapes: C channels, V vocabulary, H heads, S cache positions, D head size, L layers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tinyllm.assets import tinyllm_home
from tinyllm.kv_cache import KVCache
from tinyllm.quantize import huge_page_zeros_like_all

if TYPE_CHECKING:
    from tinyllm.model import GPT

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_step.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
FALLBACK_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")  # compilers without -march=native
MAX_THREADS = 256  # the C side's limit (csrc/decode_step.c)
PANEL = 16  # outputs per panel in `PanelLinear`'s weight copy (one 16-float vector)
_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_FAILED: dict[Path, str] = {}  # libraries whose build failed in this process, and why (not tried again)


def _compiler() -> list[str] | None:
    """The C compiler's command: `$CC` (which may carry arguments, e.g. "ccache gcc"), else cc, gcc or clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def unavailable(device: torch.device, model: nn.Module | None = None) -> str | None:
    """Why the C decode step cannot run here (for `model`, when given), or None when it can."""
    if device.type != "cpu":
        return f"the C decode step is built for CPU decoding; this model is on {device.type}"
    if not SOURCE.is_file():
        return f"the C decode step's source is missing ({SOURCE})"
    if _compiler() is None:
        return "no C compiler found (install gcc, or set $CC)"
    if model is not None:
        tensors = [*model.parameters(), *model.buffers()]
        if any(t.dtype != torch.float32 for t in tensors):
            return "the C decode step runs float32 models (bfloat16 and int8 use the compiled step)"
        if any(type(m).__module__.startswith("torch.ao") for m in model.modules()):
            return "the C decode step runs float32 models (int8 layers use the compiled step)"
        try:
            _weights(model, copy=False)  # type: ignore[arg-type]
        except (AttributeError, TypeError, ValueError) as exc:
            return f"the C decode step does not know this model's layout: {exc}"
    return None


def _cpu() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags (a library built for one CPU may not run
    on another, e.g. in a home directory shared between machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        info = []
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in info if line.split(":")[0].strip() in wanted})).encode() or (
        platform.processor().encode()
    )


def _build() -> ctypes.CDLL:
    """Compile `csrc/decode_step.c` once per source, compiler and CPU; load it (cached in the process)."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found (install gcc, or set $CC)")
        source = SOURCE.read_bytes()
        parts = [source, " ".join(compiler).encode(), platform.machine().encode(), _cpu(), *map(str.encode, FLAGS)]
        key = hashlib.sha256(b"\0".join(parts))
        target = tinyllm_home() / "kernels" / f"decode_step-{key.hexdigest()[:16]}.so"
        library = None
        if target.is_file():
            try:
                library = ctypes.CDLL(str(target))
            except OSError as exc:  # a truncated or foreign file: build it again
                logger.warning("rebuilding the C decode step: %s does not load (%s)", target, exc)
        if library is None:
            if target in _FAILED:  # every engine would try again, a second or more each time
                raise RuntimeError(_FAILED[target])
            try:
                _compile(compiler, target)
            except RuntimeError as exc:
                _FAILED[target] = str(exc)
                raise
            library = ctypes.CDLL(str(target))
        entry(library)
        _declare_batched(library)
        _LIBRARY = library
        return library


def entry(library: ctypes.CDLL) -> ctypes._CFuncPtr:
    """The library's `tinyllm_decode_step`, its C signature declared (and `tinyllm_decode_steps`'s)."""
    fn = library.tinyllm_decode_step
    fn.restype = ctypes.c_int64
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
    many = library.tinyllm_decode_steps
    many.restype = i64
    many.argtypes = [*fn.argtypes, i64, p, i64, p, p]
    return fn


def _declare_batched(library: ctypes.CDLL) -> None:
    """Declare the C signatures of the batched steps' kernels, `tinyllm_panel_linear` and `tinyllm_decode_attention`."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    panel = library.tinyllm_panel_linear
    panel.restype = i64
    panel.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    attention = library.tinyllm_decode_attention
    attention.restype = i64
    attention.argtypes = [p, i64, i64, i64, i64, i64, p, p, i64, i64, p, i64, i64, p, ctypes.c_int]


def _compile(compiler: list[str], target: Path) -> None:
    """Build the library into `target` (atomically: another process never loads a half-written file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    errors = []
    for flags in (FLAGS, FALLBACK_FLAGS):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run(
                [*compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if run.returncode == 0:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would keep other users of a shared cache out
                os.replace(tmp, target)
                logger.info("built the C decode step in %.1f s (%s)", time.perf_counter() - t, target)
                return
            errors.append(run.stderr.strip()[-2000:])
        except (OSError, subprocess.TimeoutExpired) as exc:  # no such program, not executable, too slow
            errors.append(str(exc))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"building the C decode step failed: {errors[-1]}")


def _weights(model: GPT, *, copy: bool = True) -> tuple[list[torch.Tensor | None], float]:
    """The tensors the C step reads, in its order (None: no bias), and the LayerNorms' epsilon. `copy=False`
    only checks the layout: the MLP's second weights stay the model's own (not the blocks the C step reads)."""
    tr = model.transformer
    C, V = model.config.n_embd, model.config.vocab_size
    if C % model.config.n_head:
        raise ValueError("n_embd is not a multiple of n_head")
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError("the LayerNorms do not share one epsilon")

    def linear(m: nn.Module, n: int, k: int) -> list[torch.Tensor | None]:
        if m.weight.shape != (n, k) or (m.bias is not None and m.bias.shape != (n,)):
            raise ValueError(f"a linear's weight is {tuple(m.weight.shape)}, expected {(n, k)}")
        return [m.weight, m.bias]

    def norm(m: nn.LayerNorm) -> list[torch.Tensor | None]:
        if not m.elementwise_affine or m.weight.shape != (C,) or (m.bias is not None and m.bias.shape != (C,)):
            raise ValueError("a LayerNorm without weights of the model's width")
        return [m.weight, m.bias]

    if tr.wte.weight.shape != (V, C) or tr.wpe.weight.shape != (model.config.block_size, C):
        raise ValueError("the embeddings are not (vocab_size, n_embd) and (block_size, n_embd)")

    if model.config.n_layer < 1 or len(tr.h) != model.config.n_layer:
        raise ValueError("the model has no layers, or not as many as its config says")
    tensors: list[torch.Tensor | None] = [tr.wte.weight, tr.wpe.weight, *norm(tr.ln_f)]
    tensors += linear(model.lm_head, V, C)[:1]
    blocked = []  # where the MLP's second weights go
    for block in tr.h:
        attn, mlp = block.attn, block.mlp
        tensors += norm(block.ln_1) + linear(attn.c_attn, 3 * C, C) + linear(attn.c_proj, C, C)
        tensors += norm(block.ln_2) + linear(mlp.c_fc, 4 * C, C)
        blocked.append(len(tensors))
        tensors += linear(mlp.c_proj, C, 4 * C)
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("a head with a bias")
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError("every weight must be a contiguous float32 CPU tensor")
    if copy:
        for i, blocks in zip(blocked, column_blocks([tensors[i] for i in blocked], C), strict=True):  # type: ignore[misc]
            tensors[i] = blocks
    return tensors, eps.pop()


def column_blocks(weights: list[torch.Tensor], width: int) -> list[torch.Tensor]:
    """Copies of (N, K) weights as (K / width, N, width): block b holds columns b width .. (b + 1) width, rows
    contiguous, all in one arena on 2 MB pages where possible (the layout the C step reads the MLP's second
    weight in; one more copy of that matrix: 113 MB for GPT-2-124M)."""
    if any(w.dim() != 2 or w.shape[1] % width for w in weights):
        raise ValueError(f"column blocks of width {width} need 2-D weights whose columns are a multiple of it")
    blocks = [w.detach().reshape(w.shape[0], -1, width).transpose(0, 1) for w in weights]  # views (or copies)
    out = huge_page_zeros_like_all(blocks)
    for o, b in zip(out, blocks, strict=True):
        o.copy_(b)
    return out


def panel_shape(weight: torch.Tensor) -> tuple[int, int, int]:
    """The shape of an (N, K) weight's copy in panels of 16 outputs: (ceil(N / 16), K, 16)."""
    n, k = weight.shape
    return (-(-n // PANEL), k, PANEL)


def fill_panels(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Write an (N, K) weight into `out` (`panel_shape(weight)`, zeros; read by `PanelLinear`): panel p holds outputs
    16 p .. 16 p + 15, input-major, the last panel's missing outputs left zero. Returns `out`."""
    if out.shape != panel_shape(weight) or out.dtype != weight.dtype:
        raise ValueError(f"panels of a {tuple(weight.shape)} weight are {panel_shape(weight)}, got {tuple(out.shape)}")
    n, k = weight.shape
    full, rest = divmod(n, PANEL)
    w = weight.detach()
    out[:full].copy_(w[: full * PANEL].view(full, PANEL, k).transpose(1, 2))
    if rest:
        out[full, :, :rest].copy_(w[full * PANEL :].t())
    return out


def library() -> ctypes.CDLL:
    """The C library, every kernel declared (built once per source, compiler and CPU, loaded once per process;
    RuntimeError where it cannot be built)."""
    return _build()


class PanelLinear:
    """`y = x W^T + b` for a few rows of fp32 (batched decoding) in C, reading W from its copy in panels.

    Each 64-byte line of a panel holds 16 outputs' weights for one input, multiplied into one register per row,
    so a weight read from memory serves up to 16 rows (oneDNN's small-M GEMM ran ~1.4x slower at 8 rows here:
    `benchmarks/bench_batched_linears.py`). Every output is one sum over the inputs in order, then the bias,
    whatever the number of rows and threads: a row's result does not depend on its batch-mates (tested
    bit-equal). Building an instance builds the C library (once per machine; RuntimeError where it cannot).
    """

    def __init__(self, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
        if panels.dim() != 3 or panels.shape[2] != PANEL or panels.shape[0] != -(-out_features // PANEL):
            raise ValueError(f"panels for {out_features} outputs must be ({-(-out_features // PANEL)}, K, {PANEL})")
        if panels.dtype != torch.float32 or not panels.is_contiguous() or panels.device.type != "cpu":
            raise ValueError("panels must be a contiguous float32 CPU tensor")
        if bias is not None and (bias.shape != (out_features,) or bias.dtype != torch.float32 or bias.stride() != (1,)):
            raise ValueError(f"bias must be a contiguous float32 tensor of shape ({out_features},)")
        self.panels, self.bias, self.out_features = panels, bias, out_features
        self.in_features = panels.shape[1]
        self._fn = library().tinyllm_panel_linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, K) -> (R, N), float32 on the CPU."""
        x = x.contiguous()
        rows = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32:
            raise ValueError(f"x must be float32 (rows, {self.in_features}), got {x.dtype} {tuple(x.shape)}")
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        threads = max(1, min(torch.get_num_threads(), MAX_THREADS))
        args = (x.data_ptr(), rows, self.in_features, self.panels.data_ptr(), bias, self.out_features, y.data_ptr())
        if self._fn(*args, threads):
            raise MemoryError("the panel kernel could not allocate its buffer")
        return y


class DecodeAttention:
    """Attention for one query per row (an eager decoding step) in C, over each row's own cached positions.

    `attention(q, k, v, input_pos)` -> (B, 1, H D): q (B, H, 1, D); k, v the cache's first positions (B, H, S', D);
    input_pos (B, 1) or (1,) the rows' positions (a row attends to its positions up to its own). The C step's
    code for one head, one task per (row, head): a row's result does not depend on the other rows. torch's SDPA
    with a mask read every row's positions up to the longest (~420 us a GPT-2 layer at 8 rows here). float32, CPU;
    building it may raise RuntimeError (no C compiler).
    """

    def __init__(self) -> None:
        self._fn = library().tinyllm_decode_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        if T != 1 or k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape or v.stride() != k.stride():
            raise ValueError(f"one query per row: q (B, H, 1, D), k and v (B, H, S, D); got {q.shape}, {k.shape}")
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, k, v)):
            raise ValueError("q, k and v must be float32 CPU tensors, contiguous in their last dimension")
        if k.stride(2) != D:
            raise ValueError("each head's cached positions must be contiguous")
        pos = input_pos.reshape(-1).to(torch.int64).contiguous()  # (B,) or (1,): a copy only where needed
        if pos.numel() not in (1, B):
            raise ValueError(f"input_pos must hold one position for every row or one for all, got {input_pos.shape}")
        y = torch.empty(B, 1, H * D, dtype=torch.float32)
        threads = max(1, min(torch.get_num_threads(), MAX_THREADS))
        status = self._fn(
            q.data_ptr(), q.stride(0), q.stride(1), B, H, D, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
            pos.data_ptr(), int(pos.numel() == B), k.shape[2], y.data_ptr(), threads,
        )  # fmt: skip
        if status == -2:
            raise ValueError(f"a position is outside the {k.shape[2]} cached ones")
        if status:
            raise MemoryError("the attention kernel could not allocate its scratch")
        return y


class FusedDecoder:
    """`decoder.decode(token, cache, length)` -> (logits (1, V), [greedy token]) for one token of one sequence.

    Args:
        model: a float32 GPT on the CPU (ideally after `prepare_for_inference`: weights on 2 MB pages). Its
            weights are read in place (one matrix a layer is copied): do not re-prepare or reload it while a
            decoder uses it.

    Call `warm_up(like)` once (it builds the C step, a second the first time on a machine, and checks it
    against the eager model) with the engine's cache: a scratch cache of the same shape is written, never the
    engine's. One caller at a time (the engine's thread): calls share the decoder's scratch memory.
    """

    kind = "c"

    def __init__(self, model: GPT) -> None:
        self.model = model
        tensors, self.eps = _weights(model)
        # the C step holds their addresses: keep the memory itself alive (detached views), so that weights replaced
        # under a live decoder (`param.data = ...`) leave it reading the old values, never freed memory
        self._tensors = [None if t is None else t.detach() for t in tensors]
        self._pointers = (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])
        self._pointers_addr = ctypes.addressof(self._pointers)
        cfg = model.config
        self._config = cfg
        self._fn: object = None
        self._many: object = None
        self._burst = (ctypes.c_int64 * 0)()  # decode_many's token buffer and its address (grown as needed)
        self._burst_addr = 0
        self._stops: tuple[tuple[int, ...], object, int] = ((), None, 0)  # the last stop ids, as a C array
        self._interrupt = ctypes.c_int32(0)  # set: a running `decode_many` returns after its current step
        self._interrupt_addr = ctypes.addressof(self._interrupt)
        # per cache, by id(cache): (the cache, what keeps the addresses valid (its K/V tensors, the address and dims
        # arrays), their addresses, its context limit)
        self._plans: dict[int, tuple[KVCache, tuple[object, ...], int, int, int]] = {}
        self._threads = 0  # what the scratch is sized for: threads and cache positions
        self._positions = 0
        self._scratch: torch.Tensor | None = None
        self._scratch_addr = 0
        self._out: torch.Tensor | None = None  # the last `out` checked, and its address
        self._out_addr = 0
        self.compile_s: float | None = None

    def warm_up(self, like: KVCache) -> None:
        """Build (or load) the C step and check one step on a scratch cache against the eager model."""
        t = time.perf_counter()
        library = _build()  # it stays loaded (`_LIBRARY`)
        self._fn, self._many = library.tinyllm_decode_step, library.tinyllm_decode_steps
        scratch = KVCache.__new__(KVCache)
        scratch.k = [torch.zeros_like(k[:1]) for k in like.k]  # (1, H, S, D) per layer
        scratch.v = [torch.zeros_like(v[:1]) for v in like.v]
        scratch.max_seq_len, scratch.batch_size = like.max_seq_len, 1
        reference = KVCache.__new__(KVCache)
        reference.k, reference.v = [k.clone() for k in scratch.k], [v.clone() for v in scratch.v]
        reference.max_seq_len, reference.batch_size = like.max_seq_len, 1
        n = min(3, like.max_seq_len - 1)
        prompt = torch.arange(n).view(1, n) % self._config.vocab_size  # (1, n)
        with torch.inference_mode():
            for cache in (scratch, reference):
                self.model.hidden_states(prompt, input_pos=torch.arange(n), kv_cache=cache)
            logits, greedy = self._step(7 % self._config.vocab_size, scratch, n + 1)
            pos = torch.tensor([n])
            eager = self.model(torch.tensor([[7 % self._config.vocab_size]]), input_pos=pos, kv_cache=reference)
        eager = eager[:, -1]  # (1, V)
        if not torch.allclose(logits, eager, atol=1e-4, rtol=1e-4) or not torch.allclose(
            scratch.k[-1], reference.k[-1], atol=1e-5, rtol=1e-5
        ):
            diff = (logits - eager).abs().max().item()
            raise RuntimeError(f"the C decode step disagrees with the eager model (max logit difference {diff:.2e})")
        if greedy[0] != int(eager.argmax()) and (eager.max() - eager.topk(2).values[0, 1]).item() > 1e-4:
            raise RuntimeError("the C decode step's greedy token differs from the eager model's")
        self._plans.clear()  # the scratch cache's entry
        self.compile_s = time.perf_counter() - t
        logger.info("the C decode step is ready (%.1f s)", self.compile_s)

    def _plan(self, cache: KVCache) -> tuple[KVCache, tuple[object, ...], int, int, int]:
        """Check a cache once and keep what a call passes for it (its arrays hold addresses: keep the cache)."""
        cfg = self._config
        shape = (1, cfg.n_head, cache.max_seq_len, cfg.n_embd // cfg.n_head)
        for t in (*cache.k, *cache.v):
            if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"the C decode step needs a contiguous float32 one-slot CPU cache {shape}")
        if len(cache.k) != cfg.n_layer:
            raise ValueError(f"the cache has {len(cache.k)} layers, the model {cfg.n_layer}")
        if len(self._plans) > 64:  # callers that make a new view per call
            self._plans.clear()
        tensors = [t for kv in zip(cache.k, cache.v, strict=True) for t in kv]
        pairs = [t.data_ptr() for t in tensors]
        dims = (ctypes.c_int64 * 5)(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cache.max_seq_len)
        limit = min(cache.max_seq_len, cfg.block_size)
        kv = (ctypes.c_void_p * len(pairs))(*pairs)
        keep = (tensors, kv, dims)  # the tensors too: a cache whose `k[l]` is replaced must not leave freed memory
        plan = self._plans[id(cache)] = (cache, keep, ctypes.addressof(kv), ctypes.addressof(dims), limit)
        self._positions = max(self._positions, cache.max_seq_len)
        self._threads = 0  # size the scratch again
        return plan

    def _size_scratch(self, threads: int) -> None:
        C = self._config.n_embd
        need = 16 + 32 * threads + 13 * C + threads * (2 * C + self._positions)  # the layout in decode_step.c
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32, device="cpu")  # not torch's default dtype
            self._scratch_addr = self._scratch.data_ptr()
        self._threads = threads

    def decode(
        self, token: int, cache: KVCache, length: int, *, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits (1, V) of `token` at position `length - 1` of a one-slot `cache` (whose earlier positions hold the
        sequence so far; this step writes the token's keys and values), and their argmax as a one-id list.

        `out`: a contiguous float32 (1, V) tensor to write the logits into (a caller that reuses one spares an
        allocation a step); by default a new one.
        """
        return self._step(token, cache, length, out)

    def interrupt(self) -> None:
        """Make a `decode_many` running on another thread return after its current step (and the next one, until
        `reset_interrupt`: a caller resets it before it decides on a burst, so a request that arrives after that
        decision still ends the burst)."""
        self._interrupt.value = 1

    def reset_interrupt(self) -> None:
        self._interrupt.value = 0

    def decode_many(
        self,
        token: int,
        cache: KVCache,
        length: int,
        count: int,
        *,
        stop_ids: tuple[int, ...] = (),
        out: torch.Tensor | None = None,
    ) -> list[int]:
        """Greedy decoding of up to `count` tokens in one call: `token` at position `length - 1` as `decode`, then
        each step's argmax at the next position; stops after an id in `stop_ids` (returned last), or after the
        step during which `interrupt()` was called (or any step, while it stays set). Returns the tokens (at
        least one); `out` (or nothing) holds the last step's logits. The same ids as `count` calls of `decode`, each
        fed the last one's argmax (the same kernel), without returning to Python between steps: that return runs
        cold after every step has streamed the weights through the caches (~0.1 ms a token, measured)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        _, args, limit = self._call_args(token, cache, length, out)
        if length - 1 + count > limit:
            raise ValueError(f"{count} tokens from position {length - 1} pass the context (max {limit})")
        if len(self._burst) < count:
            self._burst = (ctypes.c_int64 * max(count, 16))()
            self._burst_addr = ctypes.addressof(self._burst)
        if stop_ids != self._stops[0]:
            array = (ctypes.c_int64 * len(stop_ids))(*stop_ids)
            self._stops = (tuple(stop_ids), array, ctypes.addressof(array) if stop_ids else 0)
        done = self._many(  # type: ignore[operator]
            *args, count, self._stops[2], len(self._stops[0]), self._burst_addr, self._interrupt_addr
        )
        return self._burst[:done]

    def _call_args(
        self, token: int, cache: KVCache, length: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[object, ...], int]:
        """Check a call's arguments; the logits tensor, the C step's arguments, the context limit."""
        if self._fn is None:
            raise RuntimeError("call warm_up() before decoding")
        # per call only what changes: the checks and addresses of a cache are kept (a step's Python runs cold,
        # after the weights have streamed through the caches, so each torch call here costs microseconds)
        plan = self._plans.get(id(cache))
        if plan is None or plan[0] is not cache:
            plan = self._plan(cache)
        _, _, kv_addr, dims_addr, limit = plan
        if not 0 < length <= limit:
            raise ValueError(f"position {length - 1} is outside the context (max {limit})")
        if not 0 <= token < self._config.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary ({self._config.vocab_size})")
        threads = max(1, min(torch.get_num_threads(), MAX_THREADS))
        if threads != self._threads:
            self._size_scratch(threads)
        if out is None:
            logits = torch.empty(1, self._config.vocab_size, dtype=torch.float32, device="cpu")
            out_addr = logits.data_ptr()
        elif out is self._out:
            logits, out_addr = out, self._out_addr
        else:
            vocab = self._config.vocab_size
            if (
                out.shape != (1, vocab)
                or out.dtype != torch.float32
                or not out.is_contiguous()
                or out.device.type != "cpu"
            ):
                raise ValueError(f"out must be a contiguous float32 CPU tensor of shape (1, {vocab})")
            logits, self._out, out_addr = out, out, out.data_ptr()
            self._out_addr = out_addr
        args = (dims_addr, self._pointers_addr, kv_addr, self._scratch_addr, out_addr, token, length - 1, self.eps)
        return logits, (*args, self._threads), limit

    def _step(
        self, token: int, cache: KVCache, length: int, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        logits, args, _ = self._call_args(token, cache, length, out)
        return logits, [self._fn(*args)]  # type: ignore[operator]
