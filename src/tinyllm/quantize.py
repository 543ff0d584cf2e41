"""Inference-time model transforms: faster kernels for a GPT's `nn.Linear` layers, bf16, int8 (gpt-fast style).

Decoding one token at a time multiplies each weight matrix by one vector, so its speed is set by how many
weight bytes are read per token and how well the kernel streams them. Measured with GPT-2-124M at batch 1 on
the 2-core CPU (BENCHMARKS.md, "Decoding"; `transformers` fp32 `generate`: 26 tokens/s):

- ``float32`` (the default, exact): oneDNN's inner product instead of MKL's single-threaded gemv, weights on
  2 MB pages: the same fp32 weights and math, 48 tokens/s (stock `nn.Linear`: 24).
- ``bfloat16``: half the bytes, lossy (the whole model and its KV cache in bf16): 42 tokens/s at batch 1,
  but the fastest float prefill.
- ``quantize="int8"``: weight-only int8, one scale per output channel, activations rounded to bf16 for the
  matmul, everything else fp32: 75 tokens/s, loss +0.001% on a trained model. Up to 16 rows (tokens x
  sequences) use the fused kernel, more a dequantized bf16 matmul, which rounds differently (within a bf16
  step): a prompt prefilled with others, or a batch of over 16 sequences, can sample differently than alone.
- ``quantize="int8-dynamic"``: fbgemm's int8 weights and per-call int8 activations: 118 tokens/s and the best
  batched throughput, loss +0.02%; a row's activations share a scale with its batch-mates, so results are
  not batch-invariant.

The transformed model is for inference only (no autograd through the new layers).
"""

from __future__ import annotations

import logging
import math
import mmap
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.errors import TinyLLMError

if TYPE_CHECKING:
    from tinyllm.fused_decode import PanelLinear

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16"]
Quantize = Literal["int8", "int8-dynamic"]
HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 4 << 20
# Above this many rows (tokens x sequences) the fused int8 kernel loses to dequantize + float matmul.
FUSED_INT8_MAX_ROWS = 16
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZE_MODES = ("int8", "int8-dynamic")


class InferenceOptionError(TinyLLMError):
    """An unknown or unsupported dtype / quantization option."""


# oneDNN builds and keeps a primitive per GEMM shape, with memory that stays with the process (measured on
# GPT-2-124M: ~6 MB a prompt length, +700 MB of RSS after 112 lengths; a server sees every length). GEMMs of
# more rows than this are padded with zero rows to one of 8 sizes per octave (under 12.5% more rows), so the
# shapes stay a small set: +190 MB over the same lengths, prefill ~5% slower (MKL's GEMM: +85 MB, ~12%;
# benchmarks/bench_prefill_memory.py).
ONEDNN_EXACT_ROWS = 16


def onednn_rows(rows: int) -> int:
    """The row count a oneDNN GEMM of `rows` rows runs at: itself up to `ONEDNN_EXACT_ROWS`, else rounded up to
    a multiple of 1/8 of its power of two."""
    if rows <= ONEDNN_EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class OneDNNLinear(nn.Module):
    """`nn.Linear` computed by oneDNN's inner product: the same parameters (tying kept) and fp32 math.

    Unpacked, every call runs oneDNN on the plain weight (on 2 MB pages). A batched Engine gives each layer a
    second copy of its weight for decoding steps (`pack_for_batches`), made once: weights changed in place later
    are not seen there. In fp32, panels that tinyllm's C kernel reads (`fused_decode.PanelLinear`, ~1.4x oneDNN's
    packed GEMM at 8 rows here), for inputs of one token per row (decoding steps, the head at prefill's last
    positions) of up to `panel_rows` rows, 1 included, so that a row's numbers do not depend on its batch-mates;
    a prompt's tokens (prefill) keep oneDNN on the plain weight. Elsewhere (no C compiler, bf16) oneDNN's blocked
    layout for several rows (`pack`: its GEMM skips the per-call reorder, 1.6-1.7x faster at 8 rows, results
    equal to the plain weight's). Larger GEMMs run at `onednn_rows` rows, padded with zeros, to bound oneDNN's
    memory.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (N, K), shared with the original module (and with wte for lm_head)
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of `weight` for several rows
        self.panels: PanelLinear | None = None  # or the C kernel's copy, for up to `panel_rows` rows
        self.panel_rows = 0

    def pack(self, batch_size: int) -> None:
        """Reorder a copy of the weight for GEMMs of about `batch_size` rows (more memory: one more copy)."""
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows == 1 and torch.compiler.is_compiling():
            # one row in a compiled graph: a multiply-and-sum, which inductor turns into one streaming
            # reduction over the weight (fused with what computes x) instead of an opaque oneDNN call
            y = (self.weight * x.unsqueeze(-2)).sum(-1)
            return y if self.bias is None else y + self.bias
        one_token_per_row = x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)  # a decoding step, not a prefill
        if (
            self.panels is not None
            and one_token_per_row
            and rows <= self.panel_rows
            and not torch.compiler.is_compiling()
        ):
            return self.panels(x.reshape(rows, self.in_features)).view(*x.shape[:-1], self.out_features)
        weight = self.packed if self.packed is not None and rows > 1 else self.weight
        padded = onednn_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        x2 = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, padded - rows))  # (padded, K)
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, self.bias, "none", [], "")[:rows]  # (rows, N)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bf16_exact_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales (N,) that bf16 represents exactly, so the kernel's bf16 scales add no error."""
    amax = weight.detach().float().abs().amax(dim=1).clamp(min=1e-8)  # (N,)
    scales = (amax / 127.0).to(torch.bfloat16)
    # rounding to bf16 may have gone down: step up one bf16 ulp where needed so |w| / scale <= 127
    too_small = scales.float() * 127.0 < amax
    return torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)


class Int8Linear(nn.Module):
    """Weight-only int8: `weight_int8` (N, K) times one bf16-exact scale per output channel (N,)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (N, K)
        scales = _bf16_exact_scales(w)  # (N,)
        q = torch.clamp(torch.round(w / scales.float().unsqueeze(1)), -127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scales)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self._fused = q.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self._fused and x2.shape[0] <= FUSED_INT8_MAX_ROWS:
            # decode: read the int8 weights once, dequantizing on the fly (activations in bf16)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scales).to(x.dtype)
        else:
            # prefill / big batches are compute-bound: dequantize and use a bf16 matmul (oneDNN, AVX512-BF16)
            w = self.weight_int8.to(torch.bfloat16) * self.scales.unsqueeze(1)  # (N, K)
            y = F.linear(x2.to(torch.bfloat16), w).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    """fbgemm's dynamically quantized Linear: per-channel int8 weights, activations quantized per call."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():  # torch marks quantized tensors deprecated (still there in 2.13)
        warnings.simplefilter("ignore", UserWarning)
        q = DynamicLinear(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
        w = linear.weight.detach().float()  # (N, K)
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (N,)
        zeros = torch.zeros_like(scales, dtype=torch.long)
        qw = torch.quantize_per_channel(w, scales.double(), zeros, 0, torch.qint8)
        q.set_weight_bias(qw, linear.bias.detach().float() if linear.bias is not None else None)
    return q


def pack_for_batches(model: nn.Module, batch_size: int, *, panels: bool = True) -> int:
    """Give each oneDNN linear of a prepared model a weight copy for batched decoding steps; returns how many
    oneDNN linears the model has (each with a copy now). fp32 models (with `panels` and a C compiler): panels for
    the C kernel (`fused_decode.PanelLinear`), all in one arena on 2 MB pages, used for steps of up to
    `batch_size` rows (the largest of the engines sharing the model); else oneDNN's blocked copy. Layers already
    given a copy keep it. Other layers (int8, plain `nn.Linear`) are left alone."""
    every = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    linears = [m for m in every if m.packed is None and m.panels is None]
    for m in every:
        if m.panels is not None:  # another engine's: now also for this one's batch size
            m.panel_rows = max(m.panel_rows, batch_size)
    if panels and linears and all(m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" for m in linears):
        from tinyllm import fused_decode  # noqa: PLC0415 (it imports this module)

        try:
            fused_decode.library()
        except (RuntimeError, OSError) as exc:  # no C compiler, or it failed: oneDNN's copy instead
            logger.warning("batched decoding uses oneDNN's GEMM: %s", exc)
        else:
            shapes = [m.weight.new_empty(fused_decode.panel_shape(m.weight)) for m in linears]  # never touched
            for m, out in zip(linears, huge_page_zeros_like_all(shapes), strict=True):
                m.panels = fused_decode.PanelLinear(fused_decode.fill_panels(out, m.weight), m.bias, m.out_features)
                m.panel_rows = batch_size
            return len(every)
    for m in linears:
        m.pack(batch_size)
    return len(every)


def onednn_available(device: torch.device | str = "cpu") -> bool:
    """Whether oneDNN's inner product runs here (CPU builds with mkldnn)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), torch.ones(3, 2), None, "none", [], "")
    except (RuntimeError, AttributeError):  # pragma: no cover - builds without oneDNN
        return False
    return bool(torch.equal(probe, torch.full((1, 3), 2.0)))


def _huge_page_tensor(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Zeros (mapped lazily) in private anonymous memory advised to use 2 MB pages; None where unsupported."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:  # one huge page more, so the tensor can start on a 2 MB boundary (THP backs only whole aligned pages)
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):  # pragma: no cover - platforms without THP
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
        offset = -start % HUGE_PAGE  # the mapping starts on a 4 KB page; the element size divides both
        # the tensor keeps `buf` alive; the unused bytes before and after it are never touched, so never mapped
        return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(shape)


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a large CPU tensor in memory Linux may back with 2 MB pages (THP via madvise), else `t` itself.

    Decoding streams every weight once per token; with 4 KB pages the hardware prefetchers stop at each page
    edge and the TLB misses more, so reading from 2 MB pages is faster (a 512 MB sum: 27 -> 35 GB/s here).
    """
    out = _huge_page_tensor(t.shape, t.dtype) if t.device.type == "cpu" else None
    return t if out is None else out.copy_(t)


def huge_page_zeros(like: torch.Tensor) -> torch.Tensor:
    """Contiguous zeros shaped like a tensor, on 2 MB pages where possible (CPU; pages are touched only when
    written)."""
    out = _huge_page_tensor(like.shape, like.dtype) if like.device.type == "cpu" else None
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device) if out is None else out


def huge_page_zeros_like_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros shaped like each of `tensors` (CPU), as views of one arena on 2 MB pages where possible, else
    `huge_page_zeros` of each. A KV cache is many tensors each smaller than a huge page (GPT-2's layers' keys for
    144 positions: 0.4 MB), so only one mapping for them all gets huge pages."""
    views = _arena_views(tensors) if all(t.device.type == "cpu" for t in tensors) else None
    return views if views is not None else [huge_page_zeros(t) for t in tensors]


def _arena_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Zeros with the dtype and shape of each of `tensors`, views of one mapping on 2 MB pages (one mapping, not
    one per tensor: THP backs only whole aligned huge pages), each starting on a cache line; None where
    unsupported or too small."""
    align = 64
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // align) * align
    arena = _huge_page_tensor((total,), torch.uint8) if tensors else None
    if arena is None:
        return None
    return [
        arena[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for t, o in zip(tensors, offsets, strict=True)
    ]


def _move_to_huge_pages(model: nn.Module) -> int:
    """Copy the model's parameters and buffers into one arena on 2 MB pages, in the order the model lists them
    (about the order a forward reads them). One mapping, not one per tensor: THP backs only the 2 MB-aligned
    part of a mapping, so per-tensor copies left a quarter of GPT-2's weights on 4 KB pages. Returns how many
    tensors moved (0 where huge pages are unsupported or the model is small)."""
    tensors: list[tuple[nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None and t.device.type == "cpu" and id(t) not in seen:  # a tied weight moves once
                    seen.add(id(t))
                    tensors.append((module, name, t))
    views = _arena_views([t for _, _, t in tensors])
    if views is None:
        return 0
    with torch.no_grad():
        for (module, name, t), view in zip(tensors, views, strict=True):
            new = view.copy_(t)
            if name in module._parameters:
                module._parameters[name].data = new  # type: ignore[union-attr]
            else:
                module._buffers[name] = new
    return len(tensors)


def _swap_linears(model: nn.Module, make: object) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))  # type: ignore[operator]
                count += 1
    return count


def prepare_for_inference(
    model: nn.Module,
    *,
    dtype: DType | str = "float32",
    quantize: Quantize | str | None = None,
    onednn: bool | None = None,
    huge_pages: bool = True,
) -> nn.Module:
    """Put `model` in its inference form, in place, and return it.

    Args:
        model: a GPT (any module whose matmuls are `nn.Linear`).
        dtype: "float32" (exact) or "bfloat16" (lossy, half the bytes).
        quantize: None, "int8" (weight-only, lossy) or "int8-dynamic" (weights and activations, lossier).
        onednn: use oneDNN for the float linears; None means "on CPU when available".
        huge_pages: on CPU, copy the parameters and buffers into one arena backed by 2 MB pages (Linux THP)
            when they add up to 4 MB or more. They then share one storage: save a model before preparing it
            (safetensors refuses tensors that share memory), not after.

    The model is switched to eval mode and stops tracking gradients. Quantized layers untie `lm_head` from
    `wte` (the embedding keeps its float weights for the lookup).
    """
    if dtype not in DTYPES:
        raise InferenceOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InferenceOptionError(f"quantize must be None or one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if quantize == "int8-dynamic" and dtype != "float32":
        raise InferenceOptionError("int8-dynamic quantization runs with float32 activations; use dtype='float32'")
    model.eval().requires_grad_(False)
    device = next(model.parameters()).device
    if dtype != "float32":
        model.to(DTYPES[dtype])
    if quantize == "int8":
        n = _swap_linears(model, Int8Linear)
    elif quantize == "int8-dynamic":
        if device.type != "cpu":
            raise InferenceOptionError("int8-dynamic quantization runs on CPU only")
        n = _swap_linears(model, _dynamic_int8)
    elif onednn if onednn is not None else onednn_available(device):
        n = _swap_linears(model, OneDNNLinear)
    else:
        n = 0
    moved = _move_to_huge_pages(model) if huge_pages and device.type == "cpu" else 0
    logger.debug(
        "prepared for inference: dtype=%s quantize=%s, %d linear layers swapped, %d tensors on huge pages",
        dtype,
        quantize,
        n,
        moved,
    )
    return model
