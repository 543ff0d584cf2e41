"""A GPT with GPT-2's architecture and parameter names. Pure math: `forward` returns logits.

Notation: B batch, T time (sequence length), C channels (n_embd), H heads, D head size (C // H),
V vocabulary size, S cache positions, L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.config import ModelConfig
from tinyllm.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        cache_len: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            assert input_pos is not None
            k, v = kv_cache.update(self.layer_idx, input_pos, k, v, cache_len)  # (B, H, S', D)
            if T == 1 and kv_cache.decode_attention is not None and not torch.compiler.is_compiling():
                # one query per row, eagerly: the cache owner's kernel, each row over its own positions only
                return self.resid_dropout(self.c_proj(kv_cache.decode_attention(q, k, v, input_pos)))  # (B, 1, C)
            if T == 1 and torch.compiler.is_compiling():
                # one query per row in a compiled step: plain math that inductor fuses, not an SDPA call
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, 1, S')
                if attn_mask is not None:
                    att = att.masked_fill(~attn_mask, float("-inf"))
                y = F.softmax(att, dim=-1) @ v  # (B, H, 1, D)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, **attn_kwargs: object) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), **attn_kwargs)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, pre-norm blocks, final LayerNorm, head tied to `wte`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_len: int | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for token ids `idx` (B, T).

        Without a cache, positions are 0..T-1 and attention is causal. With a cache, `input_pos`
        gives each token's position: (T,) shared by every row, or (B, T) per row; a row attends to
        the cached positions up to and including its own. `cache_len` (the largest position + 1) may be
        given to spare reading it back from `input_pos` (a compiled decode step passes it).
        """
        B, T = idx.shape
        attn_kwargs: dict[str, object] = {}
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            if input_pos is None:
                raise ValueError("input_pos is required with a kv_cache")
            pos = input_pos
            if cache_len is None:
                cache_len = int(input_pos.max()) + 1
            if cache_len > min(self.config.block_size, kv_cache.max_seq_len):
                raise ValueError(f"position {cache_len - 1} is past the context limit")
            attn_mask = None  # one row, one token: it attends to every cached position, up to its own
            if B > 1 or T > 1:
                row_pos = input_pos if input_pos.dim() == 2 else input_pos.unsqueeze(0)  # (B|1, T)
                key_pos = torch.arange(cache_len, device=idx.device)  # (S',)
                attn_mask = key_pos.view(1, 1, 1, -1) <= row_pos.unsqueeze(1).unsqueeze(-1)  # (B|1, 1, T, S')
            attn_kwargs = dict(input_pos=input_pos, kv_cache=kv_cache, attn_mask=attn_mask, cache_len=cache_len)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, **attn_kwargs)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T). See `hidden_states` for positions."""
        return self.lm_head(self.hidden_states(idx, input_pos=input_pos, kv_cache=kv_cache))

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, *, seq_len: int | None = None, training: bool = True) -> float:
        """Approximate FLOPs per token (PaLM appendix B): 6N + 12·L·H·D·T for training, a third for inference."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True)
        flops = 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
        return flops if training else flops / 3
