"""Typed, frozen configuration: the model's shape, the training recipe and sampling parameters.

Config is data: frozen dataclasses and a small dict of named presets, passed in explicitly.
Only cli.py and the server's settings read argv or the environment.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2-architecture model.

    Attributes:
        vocab_size: number of token ids the embedding and head cover.
        block_size: the longest context (number of learned positions).
        n_layer: transformer blocks.
        n_head: attention heads per block.
        n_embd: width of the residual stream (C).
        dropout: dropout probability used while training.
        bias: whether Linear and LayerNorm layers carry a bias (GPT-2: True).
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys so a typo never passes silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        data = json.loads(path.read_text())
        return cls.from_dict(data.get("model", data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # The seed's table: embedding (1,N)->(1,N,128), blocks keep (1,N,128), head -> (1,N,50257).
    "seed": ModelConfig(block_size=128, n_layer=2, n_head=4, n_embd=128),
    # The default recipe for a 2-core CPU and a 10-minute budget (tuned by the evaluation work).
    "default": ModelConfig(block_size=256, n_layer=4, n_head=4, n_embd=256),
    # GPT-2 small, 124M parameters.
    "gpt2": ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}
