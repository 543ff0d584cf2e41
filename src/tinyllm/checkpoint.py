"""Save and load a self-describing checkpoint directory; the one loader used by train, generate, serve and export.

A checkpoint is a directory:

    model.safetensors        the unwrapped, uncompiled model (tied head stored once, as `transformer.wte.weight`)
    config.json              {"format_version": 1, "model": ModelConfig.to_dict()}
    meta.json                tokenizer, step, tokens seen, val loss / bpb, data sources, created, tinyllm version, ...
    optimizer.safetensors    optional, for resuming: the optimizer state's tensors ...
    optimizer.json           ... and its structure (non-tensor parts, with references to the tensors)
    train_state.json         optional: step, RNG states, data position, scheduler (tensors, if any, in
    train_state.safetensors  train_state.safetensors)

Nothing is pickled: nested dicts / lists / tuples of tensors, numpy arrays and JSON scalars are stored as
JSON with each tensor replaced by a reference into a safetensors file. Writes are atomic (a temp directory
next to the target, fsynced, then renamed over it); loads are strict and fail with one clear `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinyllm import __version__
from tinyllm.config import ModelConfig
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.tokenizer import (
    RANKS_FILE,
    TOKENIZER_JSON,
    Tokenizer,
    get_tokenizer,
    gpt2_source_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREVIOUS_DIR = "previous"  # a run dir's run before, set aside by a rerun until that saves (train.py)
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_FILE = "train_state.safetensors"
_CHECKPOINT_FILES = {
    MODEL_FILE,
    CONFIG_FILE,
    META_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_JSON,
    TRAIN_STATE_JSON,
    TRAIN_STATE_FILE,
    TOKENIZER_JSON,
    RANKS_FILE,
}
TIED_KEY = "lm_head.weight"  # stored once, as transformer.wte.weight
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class CheckpointError(TinyLLMError):
    """A checkpoint (or model weights) is missing, incomplete, corrupt, or does not fit its config."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config, its metadata and where it came from."""

    model: GPT
    config: ModelConfig
    meta: dict[str, Any]
    path: Path

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the model was trained with (stored inside the checkpoint, or GPT-2's by name)."""
        return checkpoint_tokenizer(self.path, self.meta)


def tokenizer_from_meta(meta: Mapping[str, Any], model: GPT | None = None) -> Tokenizer:
    """The tokenizer a `resolve_model` meta describes (a checkpoint's own files first, else by name); with
    `model`, checked to fit its vocabulary (`check_tokenizer_fits`)."""
    tokenizer = get_tokenizer(str(meta.get("tokenizer_dir") or meta.get("tokenizer", "gpt2")))
    if model is not None:
        check_tokenizer_fits(model, tokenizer, str(meta.get("source", "the model")))
    return tokenizer


def check_tokenizer_fits(model: GPT, tokenizer: Tokenizer, source: str) -> None:
    """A `CheckpointError` when the tokenizer makes ids past the model's vocabulary (a Hugging Face directory
    without the vocab.json it was trained with gets GPT-2's): every prompt would fail, so it fails at load."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{source}: its tokenizer ({tokenizer.name}, {tokenizer.vocab_size} tokens) makes ids past the model's "
            f"{model.config.vocab_size}-token vocabulary; put the vocab.json of the tokenizer it was trained with "
            "beside its weights"
        )


def checkpoint_tokenizer(path: str | Path, meta: Mapping[str, Any] | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint at `path`: its own files if present, else the one its meta names."""
    path = Path(path)
    if (path / TOKENIZER_JSON).exists():
        return load_tokenizer(path)
    return get_tokenizer((meta or {}).get("tokenizer", "gpt2"))


# --- the model's weights -------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: no wrapper prefixes, the tied head left out, contiguous CPU tensors."""
    model = unwrap_model(model)
    state = {}
    for key, tensor in model.state_dict().items():
        key = key.replace("_orig_mod.", "").removeprefix("module.")  # a compiled submodule leaks its prefix
        if key != TIED_KEY:
            state[key] = tensor.detach().cpu().contiguous()
    return state


def build_model(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "weights",
) -> GPT:
    """A `GPT` in eval mode holding `state_dict` (our names); strict about keys and shapes.

    `lm_head.weight` may be absent (it is tied to `transformer.wte.weight`) or present and equal to it.
    Floating tensors are cast to `dtype` when given. `source` names the weights in error messages.
    """
    _check_outline(config, state_dict, source)
    with torch.device("meta"):  # no memory, no random init: every parameter is assigned below
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
    state = dict(state_dict)
    head = state.pop(TIED_KEY, None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit the model config ({_list_keys('missing', missing)}"
            f"{'; ' if missing and unexpected else ''}{_list_keys('unexpected', unexpected)})"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but the config needs {tuple(shape)}"
            )
    wte = state["transformer.wte.weight"]
    if head is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight; only tied heads load")
    try:
        tensors = {k: _cast(v, device, dtype) for k, v in state.items()}
    except (MemoryError, torch.OutOfMemoryError) as exc:
        gb = sum(v.numel() for v in state.values()) * (dtype or wte.dtype).itemsize / 1e9
        raise CheckpointError(f"{source}: not enough memory on {device} for its {gb:.1f} GB of weights") from exc
    tensors[TIED_KEY] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters: tie them again
    return model.eval()


def _check_outline(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """The config's layer count and embedding shapes against the weights, before a model is built from it:
    a config from elsewhere must not make the loader build 20,000 blocks (a minute and a GB on the meta
    device) only to find that the file holds two."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if len(layers) != config.n_layer:
        raise CheckpointError(
            f"{source}: the config says n_layer={config.n_layer} but the weights hold {len(layers)} blocks"
        )
    for key, shape in {
        "transformer.wte.weight": (config.vocab_size, config.n_embd),
        "transformer.wpe.weight": (config.block_size, config.n_embd),
    }.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state_dict[key].shape)} but the config needs {shape}"
            )


def _cast(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype).contiguous()
    return t.to(device=device).contiguous()


def _list_keys(label: str, keys: list[str], limit: int = 6) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"{label}: {shown}"


# --- state without pickle: JSON structure + safetensors tensors ----------------------------------


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """JSON-able structure for `obj`; tensors go into `tensors` and leave a {"__tensor__": key} behind."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous():
            t = t.clone()  # safetensors refuses tensors that share memory
        storages.add(t.untyped_storage().data_ptr())
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors, storages) for k, v in obj.items()}
        # non-string keys (an optimizer's parameter ids) keep their type as a list of pairs
        return {
            "__items__": [
                [_encode(k, f"{path}.k{i}", tensors, storages), _encode(v, f"{path}.{k}", tensors, storages)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (tensors, arrays, JSON values)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, ready to store in `train_state`."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned (CUDA states only where a GPU is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- atomic directory writes ---------------------------------------------------------------------


@contextmanager
def atomic_directory(target: str | Path, *, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp directory next to `target`; on success fsync it and rename it over `target`.

    An existing `target` is replaced only when it is empty or `may_replace(target)` says so, so a
    mistyped path never deletes an unrelated directory. On error the temp directory is removed.
    """
    target = Path(target).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (may_replace and may_replace(target)):
            raise CheckpointError(f"{target} exists and is not a directory this command wrote; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():  # safetensors writes its files owner-only; the rest of a checkpoint follows the umask
                os.chmod(f, 0o666 & ~_umask())
            _fsync(f)
        _fsync(tmp)
        if target.exists() and _exchange(tmp, target):  # one atomic step: `target` is never missing
            shutil.rmtree(tmp, ignore_errors=True)  # (it holds the old copy now)
        elif target.exists():  # two renames: a kill between them leaves .old-* and .tmp-* but no `target`
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync(target.parent)
        _remove_leftovers(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux's renameat2 with RENAME_EXCHANGE); False where that is not
    available (another OS, an old C library, a filesystem without it), so the caller renames twice."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


LEFTOVER_AGE_S = 3600.0


def _remove_leftovers(target: Path) -> None:
    """Remove the temp and old copies of `target` that a killed writer (kill -9, power loss) left beside it.

    Only once `target` itself is in place, and only those untouched for `LEFTOVER_AGE_S`, so a writer still
    at work on the same target (another process) keeps its own."""
    cutoff = time.time() - LEFTOVER_AGE_S
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.info("removed %s, left by an interrupted save", path)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# --- save ----------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    meta: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        path: the checkpoint directory (replaced if it is already a checkpoint).
        model: a `GPT`, possibly wrapped by DDP or `torch.compile`.
        meta: metadata (tokenizer, step, tokens_seen, val_loss, val_bpb, data_sources, any extra keys);
            `created` (UTC ISO time) and `tinyllm_version` are filled in.
        optimizer: an optimizer or its state dict, saved for resuming.
        train_state: step, RNG states (see `capture_rng_state`), data position, scheduler, ...
        tokenizer: the model's tokenizer; its files are stored inside (a trained BPE travels with its model).
    """
    inner = unwrap_model(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_checkpoint expects a tinyllm GPT, got {type(inner).__name__}")
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta_json = {"tokenizer": "gpt2", **(meta or {}), "created": created, "tinyllm_version": __version__}
    if tokenizer is not None:
        meta_json["tokenizer"] = tokenizer.name
    texts = {
        CONFIG_FILE: json.dumps({"format_version": FORMAT_VERSION, "model": inner.config.to_dict()}, indent=2),
        META_FILE: json.dumps(meta_json, indent=2),
    }
    blobs: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: model_state_dict(inner)}
    if optimizer is not None:
        opt_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        blobs[OPTIMIZER_FILE] = {}
        texts[OPTIMIZER_JSON] = json.dumps(_encode(opt_state, "optimizer", blobs[OPTIMIZER_FILE], set()))
    if train_state is not None:
        blobs[TRAIN_STATE_FILE] = {}
        texts[TRAIN_STATE_JSON] = json.dumps(_encode(train_state, "train", blobs[TRAIN_STATE_FILE], set()), indent=1)
    try:
        with atomic_directory(path, may_replace=_written_by_us) as tmp:
            for name, tensors in blobs.items():
                if tensors or name == MODEL_FILE:
                    save_file(tensors, tmp / name, metadata={"format": "pt"})
            for name, text in texts.items():
                (tmp / name).write_text(text + "\n")
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only or vanished folder: one clear line
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        previous = " (the checkpoint there before is unchanged)" if Path(path).exists() else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}{previous}") from exc
    logger.info("saved checkpoint %s", path)
    return Path(path)


# --- load ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); re-save it or use another checkpoint") from exc


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of the checkpoint at `path`, with every way it can be wrong reported clearly."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory ({CONFIG_FILE}, {MODEL_FILE}, ...)")
    if not (path / CONFIG_FILE).exists() and not any((path / f).exists() for f in (MODEL_FILE, META_FILE)):
        raise CheckpointError(f"{path} is not a tinyllm checkpoint (no {CONFIG_FILE}, {META_FILE} or {MODEL_FILE})")
    data = _read_json(path / CONFIG_FILE)
    if "format_version" not in data:
        kind = f"a Hugging Face {data['model_type']} model" if "model_type" in data else "something else"
        raise CheckpointError(f"{path} is not a tinyllm checkpoint ({CONFIG_FILE} has no format_version: {kind})")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer tinyllm (format_version {version}; this tinyllm {__version__} reads "
            f"up to {FORMAT_VERSION}); upgrade tinyllm to load it"
        )
    try:
        return ModelConfig.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config ({exc})") from exc


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load a checkpoint directory strictly: the model comes back in eval mode on `device`.

    Args:
        path: the checkpoint directory.
        device: where the weights go.
        dtype: cast floating weights to this dtype (default: as saved).

    Raises:
        CheckpointError: missing, incomplete, corrupt, from a newer tinyllm, or weights that do not fit.
    """
    path = Path(path)
    config = read_config(path)
    meta = _read_json(path / META_FILE)
    model = build_model(config, _read_tensors(path / MODEL_FILE), device=device, dtype=dtype, source=str(path))
    return Checkpoint(model=model, config=config, meta=meta, path=path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json (what run wrote it, on which data), without loading its weights."""
    return _read_json(Path(path) / META_FILE)


def load_train_state(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The optimizer state dict (for `optimizer.load_state_dict`) and the train state, each None if absent."""
    path = Path(path)
    read_config(path)
    parts: list[dict[str, Any] | None] = []
    for json_name, tensor_name in ((OPTIMIZER_JSON, OPTIMIZER_FILE), (TRAIN_STATE_JSON, TRAIN_STATE_FILE)):
        if not (path / json_name).exists():
            parts.append(None)
            continue
        structure = _read_json(path / json_name)
        tensors = _read_tensors(path / tensor_name) if (path / tensor_name).exists() else {}
        try:
            parts.append(_decode(structure, tensors))
        except KeyError as exc:
            raise CheckpointError(f"{path / json_name} refers to tensor {exc} missing from {tensor_name}") from exc
    return parts[0], parts[1]


def _written_by_us(path: Path) -> bool:
    """A directory holding only checkpoint files (even a broken checkpoint) may be replaced."""
    return is_checkpoint(path) or all(p.name in _CHECKPOINT_FILES for p in path.iterdir())


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like a loadable tinyllm checkpoint (config with a format_version, weights)."""
    path = Path(path)
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and (path / MODEL_FILE).is_file()


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """`run_dir/best`, else `run_dir/last`, else `run_dir` itself, whichever is a checkpoint; else None.

    Where a rerun of the same recipe has set the run before aside in `run_dir/previous/` and not yet saved at an
    evaluation (so what `run_dir` holds is untrained or unevaluated), that run's checkpoint, with a warning.
    """
    run_dir = Path(run_dir)
    if (aside := set_aside_checkpoint(run_dir)) is not None:
        logger.warning(
            "%s: loading %s, the run a rerun set aside (the rerun has not saved at an evaluation yet)", run_dir, aside
        )
        return aside
    return _own_checkpoint(run_dir)


def _own_checkpoint(run_dir: Path) -> Path | None:
    for candidate in (run_dir / "best", run_dir / "last", run_dir):
        if is_checkpoint(candidate):
            return candidate
    return None


def set_aside_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint in `run_dir/previous/` (best, else last): the run before, which a rerun of the same recipe
    set aside and deletes once it saves at an evaluation. Else None."""
    previous = Path(run_dir) / PREVIOUS_DIR
    return next((c for c in (previous / "best", previous / "last") if is_checkpoint(c)), None)


def restore_set_aside(run_dir: str | Path) -> bool:
    """Move the run set aside in `run_dir/previous/` back into `run_dir` (best/, last/, metrics.jsonl, loss.png)
    where the rerun left no checkpoint of its own (it was killed before saving); whether it did."""
    run_dir = Path(run_dir)
    if set_aside_checkpoint(run_dir) is None or _own_checkpoint(run_dir) is not None:
        return False
    previous = run_dir / PREVIOUS_DIR
    for item in sorted(previous.iterdir()):  # the rerun's own metrics and plot are of a run that left nothing
        if item.name in ("metrics.jsonl", "loss.png") or not (run_dir / item.name).exists():
            os.replace(item, run_dir / item.name)
    shutil.rmtree(previous, ignore_errors=True)
    return True


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


_MODEL_SPECS = (
    "expected 'gpt2', a checkpoint directory, a run directory with best/ or last/, a Hugging Face GPT-2 directory, "
    "or a hub id like openai-community/gpt2"
)


def _is_hub_id(spec: str, path: Path) -> bool:
    """ "org/name" that names nothing here. Not when "org" is a local folder, or "runs" (where runs live): a
    mistyped or not yet trained `runs/default` is a missing directory, not a hub repository to retry for 25 s."""
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return False
    return not path.parent.is_dir() and path.parts[0] != "runs"


def model_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of the model `spec` names (what `resolve_model` takes), without loading its weights."""
    from tinyllm import gpt2  # gpt2 builds on this module

    path = Path(spec).expanduser()
    if path.is_dir() and (ckpt := find_checkpoint(path)) is not None:
        return checkpoint_tokenizer(ckpt)
    if spec in GPT2_NAMES or (path.is_dir() and gpt2.is_hf_gpt2_dir(path)) or _is_hub_id(spec, path):
        return gpt2_source_tokenizer(spec)
    _no_model(spec, path)


def _no_model(spec: str, path: Path) -> NoReturn:
    """Why `spec` names no model: what is wrong with a directory that looks like one, else what a spec may be."""
    if path.is_dir() and (
        broken := _first_existing(path / "best", path / "last", path / CONFIG_FILE, path / MODEL_FILE)
    ):
        load_checkpoint(broken if broken.name in ("best", "last") else path)  # raises why it does not load
        raise CheckpointError(f"{path} is not a loadable checkpoint")
    raise CheckpointError(f"no model at {spec!r}: {_MODEL_SPECS}")


def resolve_model(spec: str, *, device: torch.device | str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model (eval mode) and its metadata from a spec a person types.

    `spec` is "gpt2" (or gpt2-medium / -large / -xl) for pretrained GPT-2 from the hub, a tinyllm
    checkpoint directory, a run directory holding `best/` or `last/`, a Hugging Face GPT-2 directory,
    or a hub id such as "openai-community/gpt2". The metadata gains `kind` ("checkpoint" or "gpt2") and
    `source` (where the weights came from).
    """
    from tinyllm import gpt2  # gpt2 builds on this module

    path = Path(spec).expanduser()
    if spec in GPT2_NAMES:
        source = f"openai-community/{spec}"
    elif path.is_dir() and (ckpt := find_checkpoint(path)) is not None:
        loaded = load_checkpoint(ckpt, device=device)
        meta = {**loaded.meta, "kind": "checkpoint", "source": str(ckpt)}
        if (Path(ckpt) / TOKENIZER_JSON).exists():
            meta["tokenizer_dir"] = str(ckpt)
        return loaded.model, meta
    elif path.is_dir() and gpt2.is_hf_gpt2_dir(path):
        source = str(path)
    elif _is_hub_id(spec, path):
        source = spec
    else:
        _no_model(spec, path)
    model = gpt2.load_gpt2(source, device=device)
    meta = {"kind": "gpt2", "source": source, "tokenizer": "gpt2"}
    if (vocab := gpt2.vocab_dir(source)) is not None:  # its own vocabulary, e.g. a `tinyllm export` of a BPE model
        meta["tokenizer_dir"] = str(vocab)
    return model, meta
