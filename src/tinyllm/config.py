"""Typed, frozen configuration: the model's shape, the training recipe and sampling parameters.

Config is data: frozen dataclasses and a small dict of named presets, passed in explicitly.
Only cli.py and the server's settings read argv or the environment.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    "default": ModelConfig(block_size=256, n_layer=3, n_head=4, n_embd=256),
    # GPT-2 small, 124M parameters.
    "gpt2": ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(block_size=1024, n_layer=48, n_head=25, n_embd=1600),
}


# The tokenizer of a preset trained from scratch when none is asked for. The default recipe's corpus-trained
# 4096-token BPE packs 2.99 bytes per token on the held-out works (GPT-2's 50257 tokens: 3.23) with a 12x
# smaller head, and reached the lowest bits per byte in 10 CPU minutes (BENCHMARKS.md, "Quality").
PRESET_TOKENIZERS: dict[str, str] = {"default": "bpe:4096"}

# The processes a preset trained from scratch runs as when none is asked for. "auto": on a CPU of several
# cores, one DDP process per core (up to `MAX_AUTO_PROCESSES`), because a small model's matmuls scale worse over
# threads than over processes: 2 processes of 1 thread trained the default recipe at 7,633 tokens/s where one of
# 2 threads made 6,300-6,900 on a 2-vCPU VM (BENCHMARKS.md, "Quality"). Elsewhere, one process.
PRESET_PROCESSES: dict[str, int | str] = {"default": "auto"}
MAX_AUTO_PROCESSES = 4

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("muon", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """One training (or fine-tuning) run: model, data, optimizer, schedule, budgets, evaluation, where to write.

    Training stops at the first budget reached (`max_steps`, `max_tokens`, `max_minutes` of wall clock) and
    the learning-rate schedule (linear warmup, then cosine decay to `min_lr`) follows that budget.

    Attributes:
        preset: name in `PRESETS` for a model trained from scratch (ignored with `model` or `init_from`).
        model: an explicit model shape; wins over `preset`.
        init_from: fine-tune from "gpt2", a hub id, a Hugging Face GPT-2 directory or a tinyllm checkpoint.
        data: files, folders, globs or "shakespeare"; empty means the built-in corpus.
        tokenizer: for a new model: "gpt2", "bpe:N" (an N-token BPE trained on the training split, once per
            corpus), or a trained tokenizer's name or directory (`tinyllm tokenizer train`). None: the preset's
            (`PRESET_TOKENIZERS`: the default recipe trains its own BPE; every other preset uses GPT-2's).
        val_fraction: share of documents held out for validation.
        processes: DDP processes started on this machine (gloo on CPU, NCCL on CUDA), or "auto": on a CPU of
            several cores one per core (up to 4), else one. None: the preset's (`PRESET_PROCESSES`: "auto" for
            the default recipe, 1 for every other preset, an explicit `model` and fine-tuning). Ignored under
            torchrun, which starts the processes itself.
        batch_size: sequences per micro-batch (per process under DDP).
        block_size: context length trained on; None means the model's (capped at the model's when fine-tuning).
        grad_accum: micro-batches per optimizer step.
        optimizer: "muon" (Muon on the blocks' weight matrices, AdamW on embeddings, biases and norms) or "adamw".
        lr: peak AdamW learning rate; min_lr: where the cosine ends (None: lr / 10). The schedule scales
            every group alike, Muon's included.
        muon_lr, muon_momentum, muon_weight_decay: Muon's peak learning rate, momentum and decoupled decay.
        warmup_steps: linear warmup length in optimizer steps.
        weight_decay: AdamW decay on 2-D weights (biases, norms and other 1-D parameters are not decayed).
        betas: AdamW betas. grad_clip: max global gradient norm (0 disables clipping).
        max_steps, max_tokens, max_minutes: budgets; at least one is set.
        eval_interval: evaluate, sample and checkpoint every this many steps (and at the end) ...
        eval_minutes: ... or when this many wall-clock minutes passed since the last time (None: steps only),
            so a slow machine still gets curve points and checkpoints.
        eval_iters: validation batches per evaluation (fixed windows, the same every time).
        log_interval: steps between metrics lines.
        seed: seeds model init, data order and sampling.
        device: "auto" (cuda > mps > cpu) or a torch device string.
        dtype: autocast dtype; "auto" is bfloat16 on CUDA (float16 without bf16 support), on CPU bfloat16 where
            a quick probe measures bf16 matmuls clearly faster (native bf16 units), else float32.
        compile: wrap the model in `torch.compile`.
        run_dir: where checkpoints (`last/`, `best/`), metrics.jsonl and loss.png go.
        resume: continue the run in `run_dir/last` exactly where it stopped.
        overwrite: start afresh in a `run_dir` that holds a run of another recipe (other data, model or
            starting point), replacing it; without it that is an error (a run of the same recipe is replaced).
        sample_prompt, sample_tokens: the short sample shown at each evaluation.
    """

    preset: str = "default"
    model: ModelConfig | None = None
    init_from: str | None = None
    data: tuple[str, ...] = ()
    tokenizer: str | None = None
    val_fraction: float = 0.1
    processes: int | str | None = None
    batch_size: int = 8
    block_size: int | None = None
    grad_accum: int = 1
    optimizer: str = "muon"
    lr: float = 6e-3
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.05
    min_lr: float | None = None
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = 10.0
    eval_interval: int = 250
    eval_minutes: float | None = 2.0
    eval_iters: int = 8
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    run_dir: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    sample_prompt: str = "\n"
    sample_tokens: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "run_dir", str(self.run_dir))
        if self.model is None and self.init_from is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        positive = ["batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "sample_tokens"]
        for name in positive + ["block_size", "max_steps", "max_tokens"]:
            value = getattr(self, name)
            if (value is not None or name in positive) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("set a budget: max_steps, max_tokens or max_minutes")
        for name in ("max_minutes", "eval_minutes"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("lr", "muon_lr", "muon_momentum", "muon_weight_decay", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)  # NaN passes every range check below (each comparison is False)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1 or not self.muon_weight_decay >= 0:
            raise ValueError("muon_lr must be positive, muon_momentum in [0, 1) and muon_weight_decay >= 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must not be negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if (
            self.processes is not None
            and self.processes != "auto"
            and (not isinstance(self.processes, int) or isinstance(self.processes, bool) or self.processes < 1)
        ):
            raise ValueError(f"processes must be a positive integer or 'auto', got {self.processes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer a new model gets: `tokenizer`, else the preset's (GPT-2's for an explicit `model`)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return PRESET_TOKENIZERS.get(self.preset, "gpt2") if self.model is None else "gpt2"

    @property
    def processes_spec(self) -> int | str:
        """How many processes train: `processes`, else the preset's (1 for an explicit `model` or fine-tuning)."""
        if self.processes is not None:
            return self.processes
        return PRESET_PROCESSES.get(self.preset, 1) if self.model is None and self.init_from is None else 1

    @property
    def final_lr(self) -> float:
        """Where the cosine decay ends."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def model_config(self) -> ModelConfig:
        """The shape of a model trained from scratch: `model` or the preset, with `block_size` applied."""
        base = self.model if self.model is not None else PRESETS[self.preset]
        return base if self.block_size is None else dataclasses.replace(base, block_size=self.block_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (stored in checkpoint metadata)."""
        out = dataclasses.asdict(self)
        out["data"], out["betas"] = list(self.data), list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
        data = dict(data)
        if isinstance(data.get("model"), dict):
            data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)


# Fine-tuning starts from trained weights: a low peak LR, a short warmup, frequent evaluation.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "lr": 6e-5,
    "warmup_steps": 10,
    "eval_interval": 50,
    "run_dir": "runs/finetune",
}
