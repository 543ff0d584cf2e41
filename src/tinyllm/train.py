"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, evaluation, checkpoints, DDP.

One entry point, `train(config)`, trains from scratch or fine-tunes (`config.init_from`), in one process, as
`config.processes` DDP processes it starts itself, or under `torchrun --nproc_per_node=N` (DDP: gloo on CPU,
NCCL on CUDA; rank 0 alone writes files). It stops at the first budget reached (steps, tokens or wall-clock
minutes) and the learning-rate schedule follows that budget, so a 10-minute run ends with a decayed LR.
Every `eval_interval` steps or `eval_minutes`, whichever comes first since the last evaluation, and at the
end, it measures validation loss and bits per byte on fixed windows, prints a short sample, redraws the loss
curve and writes `run_dir/last` (and `run_dir/best` when validation improves) atomically; `resume=True`
continues from `last` exactly (model, optimizer, schedule, step, tokens, elapsed time, RNG, data order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tinyllm.checkpoint import (
    GPT2_NAMES,
    PREVIOUS_DIR,
    capture_rng_state,
    checkpoint_tokenizer,
    is_checkpoint,
    load_checkpoint,
    load_train_state,
    model_tokenizer,
    read_config,
    read_meta,
    resolve_model,
    restore_rng_state,
    save_checkpoint,
)
from tinyllm.config import FINETUNE_DEFAULTS, MAX_AUTO_PROCESSES, ModelConfig, TrainConfig
from tinyllm.corpus import absolute_sources
from tinyllm.data import BatchSampler, prepare, tokenizer_for
from tinyllm.devices import detect_device
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.optim import configure_optimizer, lr_at
from tinyllm.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


class TrainError(TinyLLMError):
    """A training option or run directory is unusable; the message says which and what to do."""


class PeerGoneError(TrainError):
    """A process of a DDP job died, so the others' collectives failed."""


@dataclass(frozen=True)
class TrainResult:
    """What a run did and where it left its files."""

    steps: int
    tokens: int
    seconds: float
    stopped_by: str  # "max_steps", "max_tokens" or "max_minutes"
    train_loss: float | None
    val_loss: float
    val_bpb: float
    best_val_loss: float
    best_val_bpb: float
    tokens_per_second: float
    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics_path: Path
    plot_path: Path
    rank: int = 0
    stop_signal: int | None = None  # the signal that stopped an "interrupted" run (SIGINT, SIGTERM)
    val_step: int | None = None  # the step of the last evaluation (val_loss): before `steps` when interrupted

    def summary(self) -> str:
        return (
            f"trained {self.steps:,} steps, {self.tokens:,} tokens in {self.seconds / 60:.1f} min "
            f"({self.tokens_per_second:,.0f} tokens/s; stopped by {self.stopped_by}); "
            f"val loss {self.val_loss:.4f} ({self.val_bpb:.4f} bpb"
            + (f", at step {self.val_step:,}" if self.val_step is not None and self.val_step != self.steps else "")
            + "), "
            + (
                f"best {self.best_val_loss:.4f} ({self.best_val_bpb:.4f} bpb)"
                if math.isfinite(self.best_val_loss)
                else "no best yet (no evaluation after training began)"
            )
            + f"; checkpoints: {self.last_checkpoint}"
            + (f", {self.best_checkpoint}" if self.best_checkpoint else "")
        )


# --- building blocks ----------------------------------------------------------------------------


def train_config(**fields: Any) -> TrainConfig:
    """A `TrainConfig` whose invalid values raise `TrainError` (one clear line) instead of ValueError."""
    try:
        return TrainConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise TrainError(str(exc)) from None


def finetune_config(*, init_from: str, data: Sequence[str | Path], **overrides: Any) -> TrainConfig:
    """A fine-tuning config: `FINETUNE_DEFAULTS` under `overrides`, starting from `init_from`."""
    if not data:
        raise TrainError("fine-tuning needs data: pass files, folders, globs or 'shakespeare'")
    return train_config(**{**FINETUNE_DEFAULTS, **overrides, "init_from": init_from, "data": tuple(map(str, data))})


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. "auto": bf16 on CUDA (fp16 where bf16 is unsupported); on CPU bf16 only where
    `cpu_bf16_pays()` measures it faster, else fp32; fp32 on MPS."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_bf16_pays():
            return torch.bfloat16
        return torch.float32
    if requested == "float16" and device.type == "cpu":
        logger.warning("float16 on a CPU has no fast kernels (measured 20-30x slower than float32); try bfloat16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


@functools.cache
def cpu_bf16_pays(*, n: int = 768, ratio: float = 1.5) -> bool:
    """Whether a bf16 matmul runs at least `ratio` times faster than fp32 on this CPU (a ~0.1 s probe).

    CPUs with native bf16 dot products (e.g. AMD Zen 4) run bf16 matmuls about twice as fast as fp32 and
    train the default preset about 1.3x faster under autocast; elsewhere bf16 is emulated and slower (a
    Xeon measured 160 vs 318 GFLOP/s). See BENCHMARKS.md, "Training". The margin keeps noise from deciding.
    """
    import time as clock  # the real clock, whatever a caller patched into this module

    a, b = torch.randn(n, n), torch.randn(n, n)
    pairs = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, math.inf)
    for trial in range(6):  # interleaved trials after a warm-up one; the fastest of each counts
        for dtype, (x, y) in pairs.items():
            started = clock.perf_counter()
            for _ in range(4):
                x @ y
            if trial:
                best[dtype] = min(best[dtype], clock.perf_counter() - started)
    pays = best[torch.float32] >= ratio * best[torch.bfloat16]
    logger.debug("bf16/fp32 matmul speed on this CPU: %.2fx", best[torch.float32] / best[torch.bfloat16])
    return pays


def autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; nothing at float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    grad_accum: int = 1,
    amp_dtype: torch.dtype = torch.float32,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `grad_accum` micro-batches: mean loss and gradient norm (unsynced tensors)."""
    device_type = next(model.parameters()).device.type
    total = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(grad_accum):
        x, y = next_batch()  # (B, T), (B, T)
        # DDP all-reduces gradients on the last micro-batch only.
        sync = micro == grad_accum - 1 or not isinstance(model, DDP)
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(device_type, amp_dtype):
                logits = model(x)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            scaled = loss / grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum, norm


@torch.no_grad()
def sample_text(
    model: GPT,
    prompt: str,
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.8,
    tokenizer: Tokenizer | None = None,
) -> str:
    """A short continuation of `prompt` (naive loop, top-k 50, seeded; the engine does this properly)."""
    tok = tokenizer or get_tokenizer()
    ids = tok.encode(prompt) or [tok.eot_token]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)  # (1, T)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size :]
        logits = model.lm_head(model.hidden_states(context)[:, -1]).float().cpu() / temperature  # (1, V)
        top = torch.topk(logits, 50)
        choice = torch.multinomial(F.softmax(top.values, dim=-1), 1, generator=gen)  # (1, 1)
        idx = torch.cat([idx, top.indices.gather(1, choice).to(device)], dim=1)
    return tok.decode(idx[0, len(ids) :].tolist())


class _Dist:
    """This process's place in a torchrun job (WORLD_SIZE/RANK/LOCAL_RANK from torchrun), or a job of one."""

    def __init__(self, device_request: str) -> None:
        # launched by torchrun (any world size, one process included, as nanoGPT does): a process group and DDP
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.world = int(os.environ["WORLD_SIZE"]) if self.launched else 1
        self.rank = int(os.environ["RANK"]) if self.launched else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.launched else 0
        self.owns_group = False
        self.backend: str | None = None
        device = detect_device(device_request)
        if self.launched:
            if device.type == "cuda":
                device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
                self.owns_group = True
            self.backend = str(dist.get_backend())
        self.device = device
        self.is_main = self.rank == 0

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, *, finished: bool = True) -> None:
        """Leave the process group. `finished`: the run ended normally on every rank (else this rank is leaving
        by an exception, e.g. a second Ctrl-C, and its peer may be inside a step's collective)."""
        if self.owns_group and dist.is_initialized():
            if finished:
                # every rank reaches the end before the group goes away: a rank that tears gloo down while its
                # peer still talks to it aborts at exit ("terminate called without an active exception")
                dist.barrier()
            # leaving by an exception, a barrier could pair with a peer's step collective and wait for ever (a
            # double Ctrl-C that one rank saw twice hung the job); the peer's collective fails instead
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


# --- the run --------------------------------------------------------------------------------------


class _Run:
    """The state of one training run and the steps it takes; `train()` drives it."""

    def __init__(self, cfg: TrainConfig, dist_: _Dist, *, progress: bool) -> None:
        self.cfg = cfg
        self.dist = dist_
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.run_dir = Path(cfg.run_dir).expanduser()
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        choice = dtypes.index(resolve_dtype(cfg.dtype, self.device))
        self.amp_dtype = dtypes[int(self.dist.broadcast([choice])[0])]  # a measured choice: rank 0's rules
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step = self.tokens = 0
        self.elapsed_before = 0.0
        self.warmup_elapsed: float | None = None
        self.best = (math.inf, math.inf)  # (val loss, val bpb)
        self.last_eval: tuple[float, float] | None = None
        self.start_loss = math.nan  # the step-0 evaluation's: the starting weights' val loss
        self.last_eval_step = self.last_save_step = -1
        self.last_eval_time = 0.0  # elapsed seconds at the last evaluation
        self.eval_due = False
        self.stop_signal: int | None = None  # SIGINT/SIGTERM received: stop at the next step boundary
        self.diverged = False  # a training loss was not finite
        self.train_loss: float | None = None
        self.previous_run: Path | None = None  # the run before, moved aside until this one saves
        self.records: list[dict[str, Any]] = []
        self.step_time = 0.0  # EMA of one optimizer step, for stopping before the time budget
        self.reserve = 0.0  # what the final evaluation + checkpoint last cost
        self.train_seconds = 0.0
        self.session_tokens = 0

        resume_from = self._resume_path()
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 trains the tokenizer and writes the shards; the others then read them
        self.tok = self._tokenizer(resume_from)
        self.data = prepare(cfg.data or None, val_fraction=cfg.val_fraction, progress=self.progress, tokenizer=self.tok)
        if self.dist.is_main:
            self.dist.barrier()
        self._build_model(resume_from)
        self._check_replaces_the_same_recipe(resume_from)
        self.tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum * self.dist.world
        self.sampler = BatchSampler(
            self.data.tokens("train"),
            batch_size=cfg.batch_size,
            block_size=self.block_size,
            seed=cfg.seed,
            rank=self.dist.rank,
        )
        self.windows = self._eval_windows()
        self.optimizer = configure_optimizer(
            self.raw,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            device_type=self.device.type,
            optimizer=cfg.optimizer,
            muon_lr=cfg.muon_lr,
            muon_momentum=cfg.muon_momentum,
            muon_weight_decay=cfg.muon_weight_decay,
            world=self.dist.world,
            rank=self.dist.rank,
        )
        self.scaler: torch.amp.GradScaler | None = None
        torch.manual_seed(cfg.seed + self.dist.rank)
        if resume_from is not None:
            self._restore(resume_from)
        if self.amp_dtype == torch.float16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.dist.is_main:
            precision = str(self.amp_dtype).removeprefix("torch.")
            size = f"{self.raw.num_params():,}"
            procs = f"{self.dist.world} process(es)" + (f" (DDP, {self.dist.backend})" if self.dist.backend else "")
            logger.info("training %s parameters on %s in %s, %s", size, self.device, precision, procs)
        self._budget()
        model: nn.Module = torch.compile(self.raw) if cfg.compile else self.raw
        if self.dist.launched:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model
        if self.dist.is_main:
            self._open_metrics(resumed=resume_from is not None)

    # setup

    def _resume_path(self) -> Path | None:
        if not self.cfg.resume:
            return None
        last = self.run_dir / "last"
        if not is_checkpoint(last):
            if is_checkpoint(self.run_dir / PREVIOUS_DIR / "last"):  # a rerun moved it aside, then stopped unsaved
                raise TrainError(
                    f"cannot resume: no checkpoint at {last}; the run before is in {self.run_dir / PREVIOUS_DIR} "
                    f"(a new run moved it there and stopped before saving): move its best/, last/ and "
                    f"{METRICS_FILE} back into {self.run_dir} to continue it"
                )
            raise TrainError(f"cannot resume: no checkpoint at {last}; train without --resume first")
        return last

    def _tokenizer(self, resume_from: Path | None) -> Tokenizer:
        """A resumed or fine-tuned model keeps its tokenizer; a new model uses `TrainConfig.tokenizer`."""
        if resume_from is not None:
            return checkpoint_tokenizer(resume_from)
        if self.cfg.init_from is not None:  # a checkpoint's own, a GPT-2 directory's own vocabulary, else GPT-2's
            return model_tokenizer(self.cfg.init_from)
        return tokenizer_for(self.cfg.tokenizer_spec, self.cfg.data or None, val_fraction=self.cfg.val_fraction)

    def _model_config(self) -> ModelConfig:
        return dataclasses.replace(self.cfg.model_config(), vocab_size=self.tok.vocab_size)

    def _build_model(self, resume_from: Path | None) -> None:
        cfg = self.cfg
        self.init_meta: dict[str, Any] = {}
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from, device=self.device)
            self._check_resumable(ckpt.config, ckpt.meta)
            model = ckpt.model
        elif cfg.init_from is not None:
            model, self.init_meta = resolve_model(cfg.init_from, device=self.device)
        else:
            torch.manual_seed(cfg.seed)  # the same initial weights on every rank
            model = GPT(self._model_config()).to(self.device)
        self.raw: GPT = model.float().train()
        model_block = self.raw.config.block_size
        self.block_size = min(cfg.block_size or model_block, model_block)
        if cfg.block_size and cfg.block_size > model_block and self.dist.is_main:
            logger.warning("block_size %d capped at the model's %d", cfg.block_size, model_block)

    def _check_replaces_the_same_recipe(self, resume_from: Path | None) -> None:
        """A fresh run where a run of another recipe (other data, model or starting point) left its checkpoints
        would replace a trained model (e.g. `tinyllm train --data notes/` over `make run`'s runs/default): an
        error unless `overwrite`. The same recipe again (`python train.py` twice) replaces it, with a warning."""
        # the run set aside first: while it waits, what is here is a stopped rerun's, and it is the one replaced
        places = [self.run_dir / PREVIOUS_DIR / n for n in ("last", "best")]
        places += [self.run_dir / n for n in ("last", "best")]
        last = next((path for path in places if is_checkpoint(path)), None)
        if resume_from is not None or self.cfg.overwrite or last is None:
            return
        try:
            config, meta = read_config(last), read_meta(last)
        except TinyLLMError:
            return  # unreadable: replacing it loses nothing usable
        saved = meta.get("train_config") or {}
        differs = []
        if meta.get("data_hash") != self.data_hash():
            differs.append(f"data {', '.join(saved.get('data') or ['shakespeare'])}")
        if not _same_init(saved.get("init_from"), self.cfg.init_from):
            differs.append(f"started from {saved.get('init_from') or 'scratch'}")
        if self.cfg.init_from is None and config != self._model_config():
            differs.append(f"a {config.n_layer}-layer, {config.n_embd}-wide model")
        if differs:
            that = (
                f"move it back from {last.parent} to continue it" if last.parent.name == PREVIOUS_DIR
                else "--resume to continue that one"
            )  # fmt: skip
            raise TrainError(
                f"{self.run_dir} holds a run of another recipe ({'; '.join(differs)}); pass --run-dir DIR for "
                f"this one, {that}, or --overwrite to replace it"
            )

    def _check_resumable(self, config: Any, meta: dict[str, Any]) -> None:
        saved = meta.get("train_config") or {}
        then, now = saved.get("init_from"), self.cfg.init_from
        if then and not now:  # `train --resume` on a fine-tune: its model is --from's, whatever --preset says
            raise TrainError(
                f"cannot resume {self.run_dir / 'last'}: it is a fine-tune of {then}; continue it with "
                f"`tinyllm finetune --from {then} --run-dir {self.run_dir} --resume` (and its data)"
            )
        if now and not then:
            raise TrainError(
                f"cannot resume {self.run_dir / 'last'}: it was trained from scratch, not fine-tuned from {now}; "
                f"continue it with `tinyllm train --run-dir {self.run_dir} --resume` (and its options), or pass "
                "another --run-dir for this fine-tune"
            )
        problems = []
        if self.cfg.init_from is None and config != self._model_config():
            ours = self._model_config().to_dict()
            fields = [f"{k} {v} (this run: {ours[k]})" for k, v in config.to_dict().items() if ours.get(k) != v]
            hint = f"; it was trained with --preset {saved['preset']}" if saved.get("preset") else ""
            problems.append(f"its model differs: {', '.join(fields)}{hint}")
        if not _same_init(saved.get("init_from"), self.cfg.init_from):
            problems.append(f"it started from {saved.get('init_from')!r}, this run from {self.cfg.init_from!r}")
        if meta.get("data_hash") != self.data_hash():
            problems.append("it was trained on different data")
        if problems:
            raise TrainError(
                f"cannot resume {self.run_dir / 'last'}: {'; '.join(problems)}; "
                "use the original options or another --run-dir"
            )
        changed = [
            f"{name} {getattr(self.cfg, name)} (was {saved[name]})"
            for name in _RECIPE_FIELDS
            if name in saved and saved[name] != _jsonish(getattr(self.cfg, name))
        ]
        if changed and self.dist.is_main:
            logger.warning(
                "resuming with %s: the run goes on, but not as the original would have (pass the original "
                "options for an exact continuation)",
                ", ".join(changed),
            )

    def data_hash(self) -> str:
        return str(self.data.meta["content_hash"])

    def data_split(self) -> dict[str, Any] | None:
        """Which documents were held out (for `evaluate` to score the same ones later); None for data prepared
        before splits were recorded."""
        meta = self.data.meta
        if meta.get("val_threshold") is None:
            return None
        return {"seed": meta["seed"], "val_threshold": meta["val_threshold"], "documents": meta["documents"]}

    def _eval_windows(self) -> torch.Tensor:
        """Evenly spaced validation windows (K, T+1), the same at every evaluation; this rank's share."""
        val = self.data.tokens("val")
        if len(val) < 2:
            raise TrainError("the validation split is empty; add documents or raise --val-fraction")
        T = min(self.block_size, len(val) - 1)
        if T < self.block_size and self.dist.is_main:
            logger.warning("validation split has %d tokens: evaluating on %d-token windows", len(val), T)
        starts = np.linspace(0, len(val) - T - 1, self.cfg.eval_iters * self.cfg.batch_size).round().astype(np.int64)
        windows = np.stack([np.asarray(val[s : s + T + 1], dtype=np.int64) for s in starts])  # (K, T+1)
        return torch.from_numpy(windows[self.dist.rank :: self.dist.world]).to(self.device)

    def _budget(self) -> None:
        cfg = self.cfg
        limits = []
        if cfg.max_steps is not None:
            limits.append((cfg.max_steps, "max_steps"))
        if cfg.max_tokens is not None:
            remaining = (cfg.max_tokens - self.tokens) // self.tokens_per_step
            if self.step == 0 and remaining < 1:
                raise TrainError(
                    f"max_tokens {cfg.max_tokens:,} is less than one step's {self.tokens_per_step:,} "
                    "tokens (batch x block x grad_accum x processes)"
                )
            limits.append((self.step + max(remaining, 0), "max_tokens"))
        self.step_limit, self.step_reason = min(limits) if limits else (None, None)
        self.max_seconds = cfg.max_minutes * 60 if cfg.max_minutes is not None else None

    def _restore(self, path: Path) -> None:
        try:
            self._restore_state(path)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a hand-edited or foreign train state
            raise TrainError(
                f"cannot resume {path}: its training state is malformed ({type(exc).__name__}: {exc})"
            ) from None

    def _restore_state(self, path: Path) -> None:
        opt_state, state = load_train_state(path)
        if state is None or opt_state is None:
            raise TrainError(f"cannot resume: {path} has no optimizer/training state (only `last` has it)")
        # this run's settings win over the saved ones (decay, betas, Muon's momentum, lr_scale, ...)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise TrainError(
                f"cannot resume {path}: its optimizer state does not fit --optimizer {self.cfg.optimizer} ({exc})"
            ) from None
        for group, ours in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(ours)
        self.step, self.tokens = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_before = self.last_eval_time = float(state["elapsed"])
        self.warmup_elapsed = state.get("warmup_elapsed")
        self.step_time, self.reserve = float(state.get("step_time", 0.0)), float(state.get("reserve", 0.0))
        self.best = (float(state["best_val_loss"]), float(state["best_val_bpb"]))
        self.start_loss = float(state.get("start_val_loss", math.nan))
        self.last_save_step = self.step
        # where the last evaluation was (older checkpoints were only saved right after one)
        self.last_eval_step = int(state.get("last_eval_step", self.step))
        self.last_eval_time = float(state.get("last_eval_time", self.elapsed_before))
        if state.get("last_eval") is not None:
            self.last_eval = (float(state["last_eval"][0]), float(state["last_eval"][1]))
        ranks = state["ranks"]
        if len(ranks) != self.dist.world and self.dist.is_main:
            logger.warning(
                "resuming %d processes from a run of %d: the data order will differ", self.dist.world, len(ranks)
            )
        if self.dist.rank < len(ranks):
            self.sampler.load_state_dict(ranks[self.dist.rank]["sampler"])
            restore_rng_state(ranks[self.dist.rank]["rng"])
            if len(ranks) == self.dist.world and ranks[self.dist.rank].get("window"):
                total, steps = ranks[self.dist.rank]["window"]
                self.window_before = (float(total), int(steps))
        if self.cfg.dtype == "auto" and state.get("dtype"):  # keep the precision the run started with
            self.amp_dtype = getattr(torch, state["dtype"])
        if self.amp_dtype == torch.float16 and state.get("scaler"):
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.scaler.load_state_dict(state["scaler"])
        if self.dist.is_main:
            logger.info(
                "resumed %s at step %d (%d tokens, %.1f min)", path, self.step, self.tokens, self.elapsed_before / 60
            )

    # files (rank 0)

    def _open_metrics(self, *, resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        previous = self.run_dir / PREVIOUS_DIR
        pending = any(is_checkpoint(previous / n) for n in ("best", "last"))  # a run set aside, not yet replaced
        if resumed and self.metrics_path.exists():  # drop what happened after the checkpoint (a killed run)
            for line in self.metrics_path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("step", 0) <= self.step and record.get("event") != "end":
                        self.records.append(record)
        if resumed:
            if pending:  # continuing a rerun that was stopped: its evaluations replace the run before, as they would
                self.previous_run = previous
        elif pending:
            # the run before is still set aside, so what is here is a rerun that never saved at an evaluation after
            # training (stopped, killed, or out of budget at step 0): this run starts over in its place, and the run
            # before stays set aside until this one saves at an evaluation
            for name in ("best", "last", METRICS_FILE, PLOT_FILE):
                with contextlib.suppress(FileNotFoundError):
                    _remove(self.run_dir / name)
            self.previous_run = previous
            logger.warning("%s holds the run before; deleted once this run saves at an evaluation", previous)
        elif any((self.run_dir / name).exists() for name in ("last", "best")):
            # Out of the way now: a `best` left from the earlier run would be what evaluate, generate and serve
            # load until this run saves (or for good, if it stops before). Not deleted until then: a rerun killed
            # before its first save (or a shorter budget's crash) must not take a trained model with it.
            _set_aside(self.run_dir, previous, ("best", "last", METRICS_FILE, PLOT_FILE))
            self.previous_run = previous
            logger.warning(
                "%s holds an earlier run; moved its checkpoints and metrics to %s, deleted once this run saves at "
                "an evaluation (pass --resume to continue that run instead)", self.run_dir, previous,
            )  # fmt: skip
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(_json_line(r) for r in self.records))
        os.replace(tmp, self.metrics_path)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        record = {
            "event": record.pop("event"),
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed(), 3),
            **record,
        }
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(_json_line(record))

    def _plot(self) -> None:
        from tinyllm.plots import plot_loss_curves

        name = self.cfg.init_from or self.cfg.preset
        plot_loss_curves(self.records, self.run_dir / PLOT_FILE, title=f"{self.run_dir.name} ({name})")

    # the loop

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def evaluate(self, *, track_best: bool = True) -> bool:
        """Measure validation loss and bits per byte (all ranks), log them with a sample, redraw the plot.

        Returns whether the loss is the best so far (never at the step-0 evaluation, `track_best=False`).
        """
        started = time.perf_counter()
        self.raw.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of losses, tokens)
        with torch.no_grad():
            for batch in self.windows.split(self.cfg.batch_size):
                with autocast(self.device.type, self.amp_dtype):
                    logits = self.raw(batch[:, :-1])  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
                totals += torch.stack([loss.double(), torch.tensor(batch[:, 1:].numel(), device=self.device)])
        self.dist.sum(totals)
        loss = (totals[0] / totals[1]).item()
        bpb = loss / math.log(2) * self.data.num_tokens("val") / self.data.num_bytes("val")
        sample = None
        if self.dist.is_main:
            sample = sample_text(
                self.raw,
                self.cfg.sample_prompt,
                max_new_tokens=self.cfg.sample_tokens,
                seed=self.cfg.seed,
                tokenizer=self.tok,
            )
        self.raw.train()
        improved = track_best and loss < self.best[0]
        if improved:
            self.best = (loss, bpb)
        self.last_eval, self.last_eval_step, self.last_eval_time = (loss, bpb), self.step, self.elapsed()
        self._log(
            {
                "event": "eval",
                "val_loss": loss,
                "val_bpb": bpb,
                "train_loss": self.train_loss,
                "best": improved,
                "eval_s": round(time.perf_counter() - started, 3),
                "sample": sample,
            }
        )
        if self.dist.is_main:
            logger.info(
                "step %d: val loss %.4f, %.4f bpb%s | sample: %r",
                self.step,
                loss,
                bpb,
                " (best)" if improved else "",
                sample,
            )
            self._plot()
        return improved

    def save(self, *, best: bool, replaces_previous: bool = True) -> None:
        """`run_dir/last` with everything needed to resume; `run_dir/best` (weights + meta) when best."""
        # the losses since the last metrics line too: a resumed run logs the same numbers as one never stopped
        window = [self._window[0], self._window[1]] if hasattr(self, "_window") else [0.0, 0]
        rank_state = {"sampler": self.sampler.state_dict(), "rng": capture_rng_state(), "window": window}
        ranks = self.dist.gather(rank_state)  # every rank takes part; rank 0 writes
        self.last_save_step = self.step
        if not self.dist.is_main:
            return
        loss, bpb = self.last_eval or (math.nan, math.nan)
        meta = {
            "tokenizer": self.tok.name,
            "run": "finetune" if self.cfg.init_from else "train",
            "step": self.step,
            "tokens_seen": self.tokens,
            "val_loss": loss,
            "val_bpb": bpb,
            "val_step": self.last_eval_step if self.last_eval is not None else None,  # a save between evaluations
            "train_loss": self.train_loss,
            "elapsed_s": round(self.elapsed(), 3),
            "data_sources": self.data.meta["sources"],
            "data_hash": self.data_hash(),
            "data_split": self.data_split(),
            "init_from": self.cfg.init_from,
            "init_source": self.init_meta.get("source"),
            "train_config": self.cfg.to_dict(),
        }
        state = {
            "step": self.step,
            "tokens_seen": self.tokens,
            "elapsed": self.elapsed(),
            "warmup_elapsed": self.warmup_elapsed,
            "best_val_loss": self.best[0],
            "best_val_bpb": self.best[1],
            "start_val_loss": self.start_loss,
            "world_size": self.dist.world,
            "ranks": ranks,
            "dtype": str(self.amp_dtype).removeprefix("torch."),
            "step_time": self.step_time,
            "reserve": self.reserve,
            "last_eval": list(self.last_eval) if self.last_eval is not None else None,
            "last_eval_step": self.last_eval_step,
            "last_eval_time": self.last_eval_time,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        save_checkpoint(
            self.run_dir / "last",
            model=self.raw,
            meta=meta,
            optimizer=self.optimizer.state_dict(),
            train_state=state,
            tokenizer=self.tok,
        )
        if best:
            save_checkpoint(self.run_dir / "best", model=self.raw, meta=meta, tokenizer=self.tok)
        if self.previous_run is not None and replaces_previous:  # replaced now
            trash = self.run_dir / f".{PREVIOUS_DIR}.old-{os.getpid()}"
            try:  # gone in one step: a half-deleted previous/ would still read as a run set aside
                os.replace(self.previous_run, trash)
            except OSError as exc:
                logger.warning("cannot remove %s (%s): delete it by hand", self.previous_run, exc.strerror)
            shutil.rmtree(trash, ignore_errors=True)
            self.previous_run = None

    def _eval_and_save(self) -> None:
        started = time.perf_counter()
        self.save(best=self.evaluate())
        self.reserve = time.perf_counter() - started

    def _stop_reason(self) -> tuple[str | None, float]:
        """Why to stop before the next step (None: go on), and the elapsed time all ranks agree on.

        Also decides whether the step about to run ends with an evaluation because `eval_minutes` passed.
        """
        elapsed = self.elapsed()
        out_of_time = self.max_seconds is not None and elapsed + self.step_time + self.reserve >= self.max_seconds
        eval_due = self.cfg.eval_minutes is not None and elapsed - self.last_eval_time >= self.cfg.eval_minutes * 60
        stopping = self.stop_signal is not None
        elapsed, out_of_time, eval_due, stopping = self.dist.broadcast([elapsed, out_of_time, eval_due, stopping])
        self.eval_due = bool(eval_due)  # rank 0's clock and signals rule
        if stopping:
            return "interrupted", elapsed
        if self.step_limit is not None and self.step >= self.step_limit:
            return self.step_reason, elapsed
        return ("max_minutes" if out_of_time else None), elapsed

    def lr(self, elapsed: float) -> float:
        cfg = self.cfg
        if self.step == cfg.warmup_steps and self.warmup_elapsed is None:
            self.warmup_elapsed = elapsed
        progress = []
        if self.step_limit is not None:
            span = self.step_limit - cfg.warmup_steps
            progress.append((self.step - cfg.warmup_steps) / span if span > 0 else 1.0)
        if self.max_seconds is not None:
            start = self.warmup_elapsed or 0.0
            span = self.max_seconds - start
            progress.append((elapsed - start) / span if span > 0 else 1.0)
        return lr_at(
            self.step, decay_progress=max(progress), warmup_steps=cfg.warmup_steps, lr=cfg.lr, min_lr=cfg.final_lr
        )

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Any:
        """SIGINT (Ctrl-C) or SIGTERM (`docker stop`, a scheduler) asks to stop at the next step boundary and save
        there, so `--resume` continues exactly; a second Ctrl-C stops at once, saving nothing."""

        def handle(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.stop_signal is None and self.dist.is_main:
                name = signal.Signals(signum).name
                logger.warning("%s: stopping after this step to save it (Ctrl-C again: stop at once)", name)
            self.stop_signal = signum

        with _stop_signals_to(handle):
            yield

    def run(self) -> TrainResult:
        with self._stop_on_signals():
            try:
                return self._run()
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if not _out_of_memory(exc):
                    raise
                cfg = self.cfg
                raise TrainError(
                    f"not enough memory on {self.device} for batches of {cfg.batch_size} x {self.block_size} tokens "
                    f"(at step {self.step}): lower --batch-size (and raise --grad-accum to keep the tokens per step)"
                    + (", or --block-size" if self.block_size > 64 else "")
                ) from None

    def _run(self) -> TrainResult:
        self.t0 = time.perf_counter()
        if self.step == 0:
            self.evaluate(track_best=False)  # the curves' starting point; also measures what an evaluation costs
            self.reserve = time.perf_counter() - self.t0
            self.start_loss = self.last_eval[0] if self.last_eval is not None else math.nan
        bar = self._progress_bar()
        # (sum of losses, steps) since the last metrics line, and (start, steps since then) for its tokens/s
        self._window = (*getattr(self, "window_before", (0.0, 0)), time.perf_counter(), 0)
        try:
            while True:
                reason, elapsed = self._stop_reason()
                if reason is not None:
                    break
                started = time.perf_counter()
                self._step(self.lr(elapsed), bar)
                if self.dist.broadcast([self.diverged])[0]:  # rank 0's loss decides: every rank stops together
                    raise TrainError(
                        f"training diverged at step {self.step} (the loss is not finite); nothing was saved "
                        f"from it: lower --lr (now {self.cfg.lr:g}) or raise --warmup-steps"
                    )
                took = time.perf_counter() - started  # one whole iteration, what the time budget must fit
                self.train_seconds += took
                self.step_time = took if self.step_time == 0 else 0.9 * self.step_time + 0.1 * took
                if self.step - self.last_eval_step >= self.cfg.eval_interval or self.eval_due:
                    self._eval_and_save()
                    self._window = (*self._window[:2], time.perf_counter(), 0)  # tokens/s without the evaluation
                if bar is not None:  # (a step may end past the budget: the bar stops at its end)
                    bar.update(min(self.elapsed(), bar.total) - bar.n if self.max_seconds is not None else 1)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once; a step may be half done, so nothing is saved
            logger.warning("interrupted again: stopped without saving this run's last steps")
            raise
        finally:
            if bar is not None:
                bar.close()
        if reason == "interrupted":  # between two steps: the state --resume continues from exactly
            if self.step > self.last_save_step:
                self.save(best=False, replaces_previous=False)  # Ctrl-C on a rerun by mistake: the run before stays
            if self.dist.is_main:
                logger.warning("stopped at step %d; %s holds it: --resume continues", self.step, self.run_dir / "last")
                if self.previous_run is not None:
                    logger.warning("the run before this one is still in %s (deleted once a run here saves at an "
                                   "evaluation)", self.previous_run)  # fmt: skip
            return self._finish(reason)
        if self.last_eval_step != self.step:
            self._eval_and_save()
        elif self.last_save_step != self.step:  # stopped right after the step-0 evaluation: save that model
            trained = self.step > 0  # (an untrained model, out of budget at step 0, is no best, replaces nothing)
            if trained:
                self.best = min(self.best, self.last_eval or self.best)
            self.save(best=trained and self.best == self.last_eval, replaces_previous=trained)
        return self._finish(reason)

    def _step(self, lr: float, bar: tqdm | None) -> None:
        """One optimizer step at `lr`, and a metrics line every `log_interval` steps."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, norm = train_step(
            self.model,
            self.optimizer,
            lambda: self.sampler.next_batch(self.device),
            grad_accum=cfg.grad_accum,
            amp_dtype=self.amp_dtype,
            scaler=self.scaler,
            grad_clip=cfg.grad_clip,
        )
        self.step += 1
        self.tokens += self.tokens_per_step
        self.session_tokens += self.tokens_per_step
        total, steps, start, timed = self._window
        value = loss.item()
        self.diverged = self.diverged or not math.isfinite(value)
        total, steps, timed = total + value, steps + 1, timed + 1
        self._window = (total, steps, start, timed)
        if self.step % cfg.log_interval:
            return
        self.train_loss = self.dist.sum(torch.tensor([total / steps], device=self.device)).item() / self.dist.world
        tps = timed * self.tokens_per_step / (time.perf_counter() - start)
        grad_norm = None if norm is None else norm.item()
        record = {"loss": self.train_loss, "lr": lr, "tokens_per_s": round(tps, 1), "grad_norm": grad_norm}
        self._log({"event": "train", **record})
        if bar is not None:
            bar.set_postfix_str(f"step {self.step}, loss {self.train_loss:.3f}, lr {lr:.2e}, {tps:,.0f} tok/s")
        self._window = (0.0, 0, time.perf_counter(), 0)

    def _progress_bar(self) -> tqdm | None:
        if not self.progress or not sys.stderr.isatty():  # a log file or a Docker build: no redraws (\r) in it
            return None
        if self.max_seconds is not None:  # the wall clock rules: the bar counts seconds, its ETA is the budget's
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
            return tqdm(total=self.max_seconds, initial=self.elapsed(), desc="training", bar_format=fmt)
        return tqdm(total=self.step_limit, initial=self.step, desc="training", unit="step")

    def _finish(self, reason: str | None) -> TrainResult:
        loss, bpb = self.last_eval or (math.nan, math.nan)
        result = TrainResult(
            steps=self.step,
            tokens=self.tokens,
            seconds=self.elapsed(),
            stopped_by=reason or "unknown",
            train_loss=self.train_loss,
            val_loss=loss,
            val_bpb=bpb,
            best_val_loss=self.best[0],
            best_val_bpb=self.best[1],
            tokens_per_second=self.session_tokens / max(self.train_seconds, 1e-9),
            run_dir=self.run_dir,
            last_checkpoint=self.run_dir / "last",
            best_checkpoint=self.run_dir / "best" if (self.run_dir / "best").exists() else None,
            metrics_path=self.run_dir / METRICS_FILE,
            plot_path=self.run_dir / PLOT_FILE,
            rank=self.dist.rank,
            stop_signal=self.stop_signal if reason == "interrupted" else None,
            val_step=self.last_eval_step if self.last_eval is not None else None,
        )
        if self.dist.is_main:
            self._log(
                {
                    "event": "end",
                    "stopped_by": result.stopped_by,
                    "val_loss": loss,
                    "val_bpb": bpb,
                    "best_val_loss": self.best[0],
                    "best_val_bpb": self.best[1],
                    "tokens_per_s": round(result.tokens_per_second, 1),
                }
            )
            logger.info("%s", result.summary())
            if self.cfg.init_from and self.step > 0 and self.best[0] >= self.start_loss:  # (False for NaN)
                logger.warning(
                    "no evaluation beat the starting model (val loss %.4f before fine-tuning, %.4f at best since): "
                    "best/ holds a worse model than --from; lower --lr (now %g) or give more data",
                    self.start_loss, self.best[0], self.cfg.lr,
                )  # fmt: skip
            if self.step == 0 and reason == "max_minutes":
                logger.warning(
                    "the time budget (--max-minutes %g) ran out before the first step (the step-0 evaluation took "
                    "%.1f s): the saved model is untrained; raise --max-minutes or set --max-steps",
                    self.max_seconds / 60 if self.max_seconds is not None else math.nan,
                    self.reserve,
                )
        return result


# --- entry points ----------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_processes(config: TrainConfig) -> int:
    """How many processes `train` starts: `config.processes_spec`, with "auto" resolved for this machine.

    "auto" is one process per core on a CPU of several cores (at most `MAX_AUTO_PROCESSES`), else one. Under
    torchrun (RANK and WORLD_SIZE set) it is 1: torchrun started the processes.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return 1
    spec = config.processes_spec
    if spec != "auto":
        return int(spec)
    if detect_device(config.device).type != "cpu":
        return 1
    return max(1, min(usable_cores(), MAX_AUTO_PROCESSES))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned(
    rank: int,
    config: TrainConfig,
    world: int,
    port: int,
    threads: int,
    progress: bool,
    log_level: int,
    results: Any,
) -> None:
    """One process of a job `train` spawned: torchrun's environment by hand, then the same `train`."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    from tinyllm import logs

    logs.configure(log_level if rank == 0 else max(log_level, logging.WARNING))
    publish = (lambda result: results.put(("result", rank, result))) if rank == 0 else None
    try:
        _train_here(config, progress=progress and rank == 0, publish=publish)
    except TinyLLMError as exc:
        results.put(("peer" if isinstance(exc, PeerGoneError) else "error", rank, str(exc)))
        raise


@contextlib.contextmanager
def _forward_stop_signals(processes: Sequence[Any], received: list[int]) -> Any:
    """While this process waits for the ones it spawned: SIGINT or SIGTERM to it alone (`timeout`, `kill`, `docker
    stop`) reaches them as SIGTERM, which they take as "save at the next step and stop", instead of leaving them
    training as orphans. A Ctrl-C reaches them anyway (the terminal signals the whole group); a second one to this
    process stops waiting."""
    forwarded = False

    def handle(signum: int, frame: Any) -> None:
        nonlocal forwarded
        if forwarded and signum == signal.SIGINT:
            raise KeyboardInterrupt
        forwarded = True
        received.append(signum)  # what the user sent (the processes see SIGTERM, or the terminal's SIGINT)
        for process in processes:
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGTERM)

    with _stop_signals_to(handle):
        yield


@contextlib.contextmanager
def _stop_signals_to(handle: Callable[[int, Any], None]) -> Any:
    """SIGINT and SIGTERM go to `handle` inside, the previous handlers after. Only the main thread can take
    signals: elsewhere they keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# After a second Ctrl-C, how long the spawned processes get to stop by themselves before they are killed.
STOP_GRACE_S = 5.0


def _end_processes(processes: Sequence[Any], *, grace_s: float) -> None:
    """Wait up to `grace_s` for `processes` to exit, then kill the rest (and reap them), so that none is left
    running and this process's exit does not wait for them."""
    deadline = time.monotonic() + grace_s
    try:
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:  # a third Ctrl-C cuts the wait short, not the kill
        for process in processes:
            if process.is_alive():
                logger.warning("killing training process %d: it did not stop within %.0f s", process.pid, grace_s)
                process.kill()
                process.join(5.0)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _set_aside(run_dir: Path, previous: Path, names: Sequence[str]) -> None:
    """Move `names` of `run_dir` into `previous` (replacing an older one) all together or not at all: staged in a
    sibling, so a move that fails halfway puts back what it moved and leaves the older `previous` alone."""
    staging = Path(tempfile.mkdtemp(prefix=f".{PREVIOUS_DIR}.tmp-", dir=run_dir))
    moved: list[str] = []
    try:
        for name in names:
            if (run_dir / name).exists():
                os.replace(run_dir / name, staging / name)
                moved.append(name)
        old = run_dir / f".{PREVIOUS_DIR}.old-{os.getpid()}"
        if previous.exists():  # an older one whose replacement saved but was not removed
            os.replace(previous, old)
        os.replace(staging, previous)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # an OS error, or Ctrl-C before the run's own signal handling is in place
        for name in moved:
            with contextlib.suppress(OSError):
                os.replace(staging / name, run_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _peer_gone(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the job is gone (gloo's "Connection
    reset by peer", NCCL's errors, torch's DistError family)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "nccl", "connection reset", "connection closed", "broken pipe"))


def _peer_reason(exc: BaseException) -> str:
    """The gist of a failed collective's message: gloo's "[.../pair.cc:553] Connection closed by peer [ip]:port.
    This is typically caused by..." -> "Connection closed by peer [ip]:port"."""
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if first.startswith("[") and "] " in first:
        first = first.split("] ", 1)[1]
    return first.split(". ")[0][:200]


def _resume_hint(config: TrainConfig) -> str:
    """ "; RUN/last holds step N: --resume continues" where a checkpoint survived (and where the run before waits
    in previous/), else ""."""
    last = Path(config.run_dir).expanduser() / "last"
    aside = last.parent / PREVIOUS_DIR
    kept = f"the run before is still in {aside}" if is_checkpoint(aside / "last") else ""
    try:
        step = read_meta(last).get("step") if is_checkpoint(last) else None
    except TinyLLMError:
        step = None
    if step is None:
        return f"; {kept}" if kept else ""
    return f"; {last} holds step {step}: the same command with --resume continues" + (f" ({kept})" if kept else "")


def _spawn(config: TrainConfig, world: int, *, progress: bool) -> TrainResult:
    """Run `train` as `world` DDP processes on this machine (what torchrun --standalone does) and return rank 0's
    result; a process's TinyLLMError comes back as a TrainError with its message, and stops the others."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    threads = max(1, usable_cores() // world)
    logger.info("training as %d processes of %d thread(s) each (DDP); --processes 1 for one", world, threads)
    results = mp.get_context("spawn").SimpleQueue()
    level = logging.getLogger().getEffectiveLevel()
    args = (config, world, _free_port(), threads, progress, level, results)
    context = mp.start_processes(_spawned, args=args, nprocs=world, join=False, start_method="spawn")
    failure: str | None = None
    received: list[int] = []
    try:
        with _forward_stop_signals(getattr(context, "processes", ()), received):
            while not context.join():
                pass
    except ProcessException as exc:
        failure = str(exc).strip().splitlines()[-1]
    except KeyboardInterrupt:  # a second Ctrl-C: the processes stop without saving; none may outlive this one
        _end_processes(getattr(context, "processes", ()), grace_s=STOP_GRACE_S)
        raise
    finally:  # a failed process leaves its traceback in a temporary file that torch does not remove
        for path in context.error_files:
            if path:
                Path(path).unlink(missing_ok=True)
    errors, peers, done = [], [], None
    while not results.empty():
        kind, _, value = results.get()
        if kind == "error":
            errors.append(value)
        elif kind == "peer":  # a survivor's view of a process that died: the launcher's own words say more
            peers.append(value)
        elif kind == "result":
            done = value
    if errors:
        raise TrainError(errors[0])
    if peers and failure is None:
        raise TrainError(peers[0])
    if done is None and received:  # stopped (Ctrl-C, SIGTERM) before the processes could save anything
        raise KeyboardInterrupt
    if done is None:
        raise TrainError(f"{failure or 'the training processes ended without a result'}{_resume_hint(config)}")
    if failure is not None:  # rank 0 finished the run (checkpoint written), then a peer died tearing gloo down
        logger.warning("a training process ended abnormally after the run had finished (%s)", failure)
    if received and done.stopped_by == "interrupted":  # (received first: tests pass stand-in results)
        done = dataclasses.replace(done, stop_signal=received[0])
    return done


# options that change what the steps after a resume do (the budgets and cadences may change freely)
_RECIPE_FIELDS = ("batch_size", "grad_accum", "block_size", "lr", "min_lr", "muon_lr", "warmup_steps", "seed")


def _jsonish(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, Python's MemoryError, or the CPU allocator's RuntimeError."""
    message = str(exc)
    return (
        isinstance(exc, torch.OutOfMemoryError | MemoryError)
        or "can't allocate memory" in message
        or "out of memory" in message.lower()
    )


def _json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line, strict JSON: a loss never measured (inf) or not finite is null, not `Infinity`."""
    from tinyllm.report import finite

    return json.dumps(finite(record), allow_nan=False) + "\n"


def _absolute_init(init_from: str | None) -> str | None:
    """A local checkpoint or directory as an absolute path; "gpt2" names and hub ids as they are."""
    if init_from is None or init_from in GPT2_NAMES or not Path(init_from).expanduser().exists():
        return init_from  # "gpt2" means the hub's even beside a folder of that name (as resolve_model reads it)
    return os.path.abspath(os.path.expanduser(init_from))


def _same_init(saved: str | None, current: str | None) -> bool:
    """Whether a run recorded as started from `saved` started from `current` (as `_absolute_init` gives it): a
    local checkpoint deleted since is made absolute by neither, so its path as typed is compared too."""
    if _absolute_init(saved) == current:  # (older runs recorded it as typed)
        return True
    return saved is not None and current is not None and os.path.abspath(os.path.expanduser(current)) == saved


def _check_run_dir(path: Path) -> None:
    """A run directory that is a file, or lies under one, fails now (not after the data is prepared, as an OS
    error); nothing is created."""
    existing = path.expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == path.expanduser() else f"lies under {existing}, which is"
        raise TrainError(f"run directory {path} {where} a file, not a folder; pass --run-dir DIR")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):  # read-only filesystem, or not ours
        where = "" if existing == path.expanduser() else f" ({existing} is where it would be made)"
        raise TrainError(f"run directory {path} cannot be written{where}; pass --run-dir DIR")


def _check_init_outside(config: TrainConfig) -> None:
    """A fine-tune's starting checkpoint may not lie in its run directory, which the run writes (and --overwrite
    clears): that would replace the weights it started from and lose where it came from."""
    if config.init_from is None or not Path(config.init_from).exists():
        return
    start, run_dir = Path(config.init_from).resolve(), Path(config.run_dir).expanduser().resolve()
    if start == run_dir or run_dir in start.parents:
        raise TrainError(
            f"--from {config.init_from} lies in --run-dir {config.run_dir}, which this run writes: pass another "
            "--run-dir (the fine-tune's own)"
        )


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or fine-tune, with `config.init_from`) until the first budget; return what happened.

    With `config.processes` (or its preset's "auto") above 1 this starts that many DDP processes on this
    machine and returns rank 0's result. Under `torchrun` every process calls this; each returns a result,
    rank 0 alone writes files.

    Raises:
        TrainError: unusable options or run directory (e.g. resume without a checkpoint, or a mismatched one).
        TinyLLMError: unreadable data (`CorpusError`) or weights (`CheckpointError`, `GPT2UnavailableError`).
    """
    config = dataclasses.replace(  # the run records them: the same from any directory (evaluate, --resume)
        config, data=absolute_sources(config.data), init_from=_absolute_init(config.init_from)
    )
    _check_run_dir(Path(config.run_dir))
    _check_init_outside(config)
    world = resolve_processes(config)
    with run_dir_lock(Path(config.run_dir)):
        if world > 1:
            return _spawn(config, world, progress=progress)
        return _train_here(config, progress=progress)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock (an flock: the OS lets go when the process ends, however it ends) for the whole run, so a
    second run in the same directory fails at once instead of interleaving its metrics and checkpoints with the
    first's. Taken by the launching process (rank 0 under torchrun) and removed at the end; a directory made here
    and left empty by a run that failed before writing anything is removed too."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded there
        yield
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ["RANK"] != "0":  # as _Dist.launched
        yield  # torchrun's other ranks: rank 0 holds it for the job
        return
    run_dir = run_dir.expanduser()
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # innermost first
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:  # (e.g. under /proc, or a full disk): one line, as _check_run_dir's
        why = exc.strerror or str(exc)
        raise TrainError(f"run directory {run_dir} cannot be written ({why}); pass --run-dir DIR") from None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise TrainError(
                f"{run_dir} is in use by another training run{f' (pid {holder})' if holder.isdigit() else ''}; "
                "wait for it to finish, or pass another --run-dir"
            ) from None
        except OSError as exc:  # a filesystem without flock (NFS without lockd, Lustre without -o flock)
            os.close(fd)
            logger.warning("cannot lock %s (%s): nothing stops a second run in it meanwhile", path, exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(path)
            yield
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the run before removed the file we locked as it ended: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a run waiting on this file sees it gone and takes a new one
        os.close(fd)
        if made and not any(run_dir.iterdir()):  # nothing written: leave no empty run behind
            with contextlib.suppress(OSError):
                for directory in made:
                    directory.rmdir()


def _train_here(
    config: TrainConfig, *, progress: bool, publish: Callable[[TrainResult], None] | None = None
) -> TrainResult:
    """Train in this process (alone, or as one rank of a torchrun/spawned job). `publish` gets the result
    before the process group is torn down, so a peer that dies in gloo's teardown cannot lose it."""
    job = _Dist(config.device)
    finished = False
    try:
        run = _Run(config, job, progress=progress)
        try:
            if run.progress:
                with logging_redirect_tqdm():
                    result = run.run()
            else:
                result = run.run()
        except RuntimeError as exc:
            if job.world > 1 and _peer_gone(exc):  # a process of the job died: its collectives fail in the others
                raise PeerGoneError(
                    f"another training process of this job stopped ({_peer_reason(exc)}){_resume_hint(config)}"
                ) from None
            raise
        if publish is not None:
            publish(result)
        finished = True
        return result
    finally:
        job.close(finished=finished)


def finetune(*, init_from: str, data: Sequence[str | Path], progress: bool = True, **overrides: Any) -> TrainResult:
    """Fine-tune GPT-2 ("gpt2", a hub id, a local Hugging Face directory) or a tinyllm checkpoint on `data`.

    Uses `FINETUNE_DEFAULTS` (low LR, short warmup) under `overrides` (any `TrainConfig` field); the
    block size is capped at the model's; the result is a normal checkpoint in `run_dir`.
    """
    return train(finetune_config(init_from=init_from, data=data, **overrides), progress=progress)


def default_config(*, minutes: float = 10.0, run_dir: str | Path = "runs/default", **overrides: Any) -> TrainConfig:
    """The default recipe: preset "default" on the built-in corpus for `minutes` of wall clock."""
    return train_config(**{"preset": "default", "max_minutes": minutes, "run_dir": str(run_dir), **overrides})


def train_default(
    *, minutes: float = 10.0, run_dir: str | Path = "runs/default", progress: bool = True, **overrides: Any
) -> TrainResult:
    """Train the default recipe (see `default_config`) with a progress bar; what `tinyllm run` calls."""
    return train(default_config(minutes=minutes, run_dir=run_dir, **overrides), progress=progress)
