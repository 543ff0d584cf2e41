"""A static, preallocated KV cache in SDPA layout, written by position (never `torch.cat`).

Shapes: L layers, B slots (sequences), H heads, S max positions, D head size. Each layer's keys and values
are their own tensors, so a compiled decode step writes one layer's cache in place without copying another's.
Each slot holds one sequence; positions are per slot, so sequences of different lengths share one
batch (continuous batching). Entries past a slot's current position are stale and masked out by the
model's attention mask, so a slot is reused without clearing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class KVCache:
    """Keys and values for every layer: `k[l]`, `v[l]` of shape (B, H, S, D).

    `decode_attention` (None, or set by its owner, e.g. the Engine): a faster attention the model calls for steps
    of one token per row, `decode_attention(q, k, v, input_pos)` -> (B, 1, H D) (`fused_decode.DecodeAttention`).
    """

    decode_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size

    @classmethod
    def for_model(
        cls,
        config: object,
        *,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A cache sized for a `ModelConfig` (max_seq_len defaults to its block_size)."""
        return cls(
            n_layer=config.n_layer,  # type: ignore[attr-defined]
            batch_size=batch_size,
            n_head=config.n_head,  # type: ignore[attr-defined]
            max_seq_len=max_seq_len or config.block_size,  # type: ignore[attr-defined]
            head_dim=config.n_embd // config.n_head,  # type: ignore[attr-defined]
            device=device,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def view(self, slots: torch.Tensor | slice) -> KVCache:
        """A cache over a subset of slots (a slice shares storage; an index tensor copies)."""
        sub = KVCache.__new__(KVCache)
        sub.k, sub.v = [k[slots] for k in self.k], [v[slots] for v in self.v]
        sub.max_seq_len, sub.batch_size = self.max_seq_len, sub.k[0].shape[0]
        sub.decode_attention = self.decode_attention
        return sub

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `input_pos` and return the first `length` positions (B, H, length, D).

        `input_pos` is (T,) when every row shares positions, or (B, T) for per-slot positions.
        """
        k_cache, v_cache = self.k[layer], self.v[layer]  # (B, H, S, D)
        if input_pos.dim() == 1:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
            # advanced indices around a slice put their dims first: target is (B, T, H, D)
            k_cache[rows, :, input_pos] = k.transpose(1, 2)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return k_cache[:, :, :length], v_cache[:, :, :length]
