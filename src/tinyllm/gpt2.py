"""The one mapping between Hugging Face GPT-2 checkpoints and `tinyllm.model.GPT`, both ways.

Hugging Face GPT-2 differs from our GPT in three ways only, all undone here:

- its `Conv1D` layers (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) store weights as (in, out),
  where `nn.Linear` stores (out, in);
- hub files name keys without the `transformer.` prefix (`save_pretrained` writes it) and carry the
  `attn.bias` / `attn.masked_bias` mask buffers, which we do not need;
- `lm_head.weight` is tied to `transformer.wte.weight` (often absent from the file).

Weights come from a local directory or a hub id through `huggingface_hub` (its cache, `HF_HUB_OFFLINE`);
when they cannot be had, `GPT2UnavailableError` says how to get them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tinyllm.checkpoint import CheckpointError, build_model, unwrap_model
from tinyllm.config import ModelConfig
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT

logger = logging.getLogger(__name__)

DEFAULT_HUB_ID = "openai-community/gpt2"
GPT2_EOT_ID = 50256
LAYER_NORM_EPSILON = 1e-5  # nn.LayerNorm's default, which our model uses
_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_SAFETENSORS, _SAFETENSORS_INDEX, _TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class GPT2UnavailableError(TinyLLMError):
    """Pretrained GPT-2 weights cannot be had: offline with nothing cached, hub unreachable, no such directory."""


# --- config --------------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face GPT-2 `config.json`, refusing variants our model cannot express."""
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"{source}: a config.json holds a JSON object, not {type(hf).__name__}")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}; only gpt2 loads")
    try:
        return _checked_config(hf, source)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{source}: not a usable GPT-2 config ({type(exc).__name__}: {exc})") from exc


def _checked_config(hf: Mapping[str, Any], source: str) -> ModelConfig:
    checks = {
        "layer_norm_epsilon": abs(float(hf.get("layer_norm_epsilon", LAYER_NORM_EPSILON)) - LAYER_NORM_EPSILON) < 1e-12,
        "activation_function": hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": hf.get("n_inner") in (None, 4 * int(hf.get("n_embd", 768))),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is False,
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is True,
        "add_cross_attention": hf.get("add_cross_attention", False) is False,
    }
    bad = [f"{k}={hf.get(k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise CheckpointError(f"{source}: unsupported GPT-2 variant ({', '.join(bad)})")
    return ModelConfig(
        vocab_size=_integer(hf["vocab_size"], "vocab_size"),
        block_size=_integer(hf.get("n_positions", hf.get("n_ctx", 1024)), "n_positions"),
        n_layer=_integer(hf["n_layer"], "n_layer"),
        n_head=_integer(hf["n_head"], "n_head"),
        n_embd=_integer(hf["n_embd"], "n_embd"),
        dropout=0.0,
        bias=True,
    )


def _integer(value: Any, name: str) -> int:
    """A config size: an integer (12, or 12.0 as some exporters write it), never a bool, string or 12.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def hf_config_dict(
    config: ModelConfig, *, dtype: torch.dtype = torch.float32, eot: int | None = None
) -> dict[str, Any]:
    """A complete Hugging Face `config.json` (GPT2LMHeadModel) for a model of this shape; `eot` is the
    tokenizer's end-of-text id (default: GPT-2's where the vocabulary holds it, else its last row)."""
    if eot is None:
        eot = GPT2_EOT_ID if config.vocab_size > GPT2_EOT_ID else config.vocab_size - 1
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "initializer_range": 0.02,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": 0.1,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --- weights -------------------------------------------------------------------------------------


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face GPT-2 one (either key layout); `lm_head.weight` must equal wte."""
    state: dict[str, torch.Tensor] = {}
    head = None
    for key, tensor in hf_state.items():
        if key == "lm_head.weight":
            head = tensor
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if _MASK_BUFFER.match(name):
            continue
        state[name] = tensor.t() if _CONV1D.match(name) else tensor  # Conv1D (in, out) -> Linear (out, in)
    if head is not None:
        state["lm_head.weight"] = head  # build_model checks it equals wte
    return state


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 keys (`transformer.` prefix, Conv1D (in, out)) with `lm_head.weight` tied to wte.

    A model built with `bias=False` gets zero biases, which GPT-2 always has and which change nothing.
    """
    model = unwrap_model(model)
    if not isinstance(model, GPT):
        raise TypeError(f"to_hf_state_dict expects a tinyllm GPT, got {type(model).__name__}")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        state[name] = tensor.t().contiguous() if _CONV1D.match(name) else tensor
        is_embedding = name in ("transformer.wte.weight", "transformer.wpe.weight")
        if name.endswith(".weight") and not model.config.bias and not is_embedding:
            bias_name = name.removesuffix(".weight") + ".bias"
            out_features = state[name].shape[-1] if _CONV1D.match(name) else state[name].shape[0]
            state[bias_name] = torch.zeros(out_features, dtype=tensor.dtype, device=tensor.device)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# --- loading -------------------------------------------------------------------------------------


def is_hf_gpt2_dir(path: str | Path) -> bool:
    """Whether `path` is a directory with a Hugging Face `config.json` whose model_type is gpt2."""
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == "gpt2" and "format_version" not in data


def _unavailable(source: str, reason: str) -> GPT2UnavailableError:
    return GPT2UnavailableError(
        f"GPT-2 weights from {source!r} are not available ({reason}). Download them once where the Hugging Face "
        f"hub is reachable (`hf download {source}` or `huggingface-cli download {source}`; later runs, even with "
        "HF_HUB_OFFLINE=1, use the cache), or pass a local directory holding config.json and model.safetensors"
    )


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def _fetch(source: str, filename: str) -> Path | None:
    """`filename` from a local directory or the hub; None when the repository does not have it."""
    if _is_local(source):
        path = Path(source).expanduser() / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    # OpenAI's GPT-2 repositories offline first: they do not change, so a file the cache holds (or knows the
    # repository lacks) needs no request, and a machine without a network does not wait out the hub's retries
    # (~25 s) for weights it has. Other repositories may change: the download below checks the cached copy is
    # current (and falls back to it when the hub cannot be reached), so files of two revisions never mix.
    from tinyllm.checkpoint import GPT2_NAMES

    if source.removeprefix("openai-community/") in GPT2_NAMES and source.startswith("openai-community/"):
        cached = try_to_load_from_cache(source, filename)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # cached as missing from the repository
            return None
    # Honour HF_HUB_OFFLINE even when it was set after huggingface_hub read its environment at import.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(hf_hub_download(source, filename, local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        if filename == "config.json":  # the config is always there: nothing cached, or offline
            raise _unavailable(source, "offline and not in the Hugging Face cache" if offline else str(exc)) from exc
        return None
    except EntryNotFoundError:
        return None
    except Exception as exc:  # network, HTTP (401, 404 repository, 5xx), invalid repo id: all "cannot have it"
        raise _unavailable(source, f"{type(exc).__name__}: {exc}") from exc


def vocab_dir(source: str) -> Path | None:
    """The directory holding the vocabulary of GPT-2 model `source` (`vocab.json`, or only a Hugging Face
    `tokenizer.json`, as transformers 5 saves; a local directory, or the hub cache's snapshot of a hub id), or
    None where GPT-2's own tokenizer applies: OpenAI's GPT-2 sizes, and a source without one (a hub repository
    that cannot be reached is logged and treated as such)."""
    from tinyllm.checkpoint import GPT2_NAMES
    from tinyllm.tokenizer import HF_VOCAB_FILE, TOKENIZER_JSON, hf_tokenizer_vocab

    if source in GPT2_NAMES or source.removeprefix("openai-community/") in GPT2_NAMES:
        return None
    try:
        if (path := _fetch(source, HF_VOCAB_FILE)) is not None:
            return path.parent
        path = _fetch(source, TOKENIZER_JSON)
    except GPT2UnavailableError as exc:
        logger.warning("no vocabulary for %s (%s); using GPT-2's tokenizer", source, exc)
        return None
    return path.parent if path is not None and hf_tokenizer_vocab(path) is not None else None


def _read_weights(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The raw Hugging Face state dict: model.safetensors, else its shards, else pytorch_model.bin."""
    try:
        if path := _fetch(source, _SAFETENSORS):
            return load_file(path), str(path)
        if index_path := _fetch(source, _SAFETENSORS_INDEX):
            names = list(json.loads(index_path.read_text())["weight_map"].values())
            for shard in names:
                if not _plain_file_name(shard):  # the index names files beside it, never a path out of it
                    raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in that directory")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(names)):
                shard_path = _fetch(source, shard)
                if shard_path is None:
                    raise _unavailable(source, f"shard {shard} listed in {_SAFETENSORS_INDEX} is missing")
                state.update(load_file(shard_path))
            return state, str(index_path)
        if path := _fetch(source, _TORCH_BIN):
            return torch.load(path, map_location="cpu", weights_only=True), str(path)  # never unpickle code
    except (
        SafetensorError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RuntimeError,
        pickle.UnpicklingError,
    ) as exc:
        raise CheckpointError(f"GPT-2 weights from {source!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    raise _unavailable(source, f"no {_SAFETENSORS} or {_TORCH_BIN} there or in the cache")


def _plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not Path(name).is_absolute()
        and not PureWindowsPath(name).drive
    )


def load_gpt2(
    source: str = DEFAULT_HUB_ID, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> GPT:
    """Pretrained GPT-2 as a `GPT` in eval mode, from a hub id or a local Hugging Face directory.

    Args:
        source: a hub id ("openai-community/gpt2") or a directory with config.json and model.safetensors
            (or pytorch_model.bin, read with `weights_only=True`).
        device: where the weights go.
        dtype: floating dtype of the weights.

    Raises:
        GPT2UnavailableError: the weights cannot be had (offline and not cached, hub unreachable, no directory).
        CheckpointError: the files are there but are not a GPT-2 our model can hold.
    """
    source = str(source)
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise _unavailable(source, "no such directory")
    config_path = _fetch(source, "config.json")
    if config_path is None:
        raise _unavailable(source, "no config.json there")
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from exc
    config = config_from_hf(hf_config, source=str(config_path))
    hf_state, weights_path = _read_weights(source)
    state = from_hf_state_dict(hf_state)
    model = build_model(config, state, device=device, dtype=dtype, source=weights_path)
    logger.info("loaded GPT-2 (%.1fM parameters) from %s", model.num_params() / 1e6, source)
    return model
