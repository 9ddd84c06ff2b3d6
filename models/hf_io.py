"""Hugging Face model directories: config.json <-> ModelConfig, and HF weight names <-> our parameters.

Our parameters are a flat dict keyed by NNX state paths (`("blocks", 3, "attn", "q_DxNxH")`) holding
numpy arrays in models/llama.py's layout. HF stores every projection as a torch Linear weight
[out_features, in_features]; ours are [in, out] with the head dimensions split out:

    q_DxNxH = q_proj.weight.T.reshape(D, N, H)      o_NxHxD = o_proj.weight.T.reshape(N, H, D)
    gate_DxF = gate_proj.weight.T                   down_FxD = down_proj.weight.T
    embed_VxD = embed_tokens.weight                 lm_head_DxV = lm_head.weight.T
    q_bias_NxH = q_proj.bias.reshape(N, H)          (Qwen2; k and v biases alike, with K heads)
    q_norm.scale = q_norm.weight                    (Qwen3; k_norm alike: one head_dim vector each)

Both use RoPE's rotate-half pairing (i, i + H/2), so no permutation is needed (GGUF files differ:
models/gguf_io.py undoes theirs before calling into here).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models import families, safetensors_io
from models.config import ModelConfig, RopeScaling
from models.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = tuple(f.hf_architecture for f in families.FAMILIES)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

ParamPath = tuple[str | int, ...]
Params = dict[ParamPath, np.ndarray]


class HFModelError(UserError, ValueError):
    """A Hugging Face model directory we cannot load: bad config, missing or mismatched weights."""


# -- config -------------------------------------------------------------------------------------------

def _rope_from_hf(data: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope theta and Llama-3 scaling, from transformers-5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or params
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise HFModelError(
            f"{source}: rope scaling type {rope_type!r} is not supported; expected none ('default') or 'llama3'"
        )
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise HFModelError(f"{source}: llama3 rope scaling lacks the key {e.args[0]!r}") from None


def family_of(data: Mapping[str, Any], source: str = "config.json") -> families.Family:
    """The model family (models/families/) a transformers config.json dict describes."""
    architectures = data.get("architectures")
    if architectures:
        arch, family = architectures[0], families.by_hf_architecture(architectures[0])
    else:  # configs saved from a bare config object name only their model_type
        arch, family = f"model_type {data.get('model_type')}", families.by_hf_model_type(data.get("model_type"))
    if family is None:
        raise HFModelError(
            f"{source}: unsupported architecture '{arch}'; cairl runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return family


def config_from_hf(data: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config.json dict; rejects architectures and options we cannot run."""
    family = family_of(data, source)
    for flag in ("attention_bias", "mlp_bias"):
        if data.get(flag):
            raise HFModelError(f"{source}: {flag}=true is not supported (cairl's {family.name} model has no biases "
                               f"on the {'attention output' if flag == 'attention_bias' else 'MLP'} projections)")
    if data.get("hidden_act", "silu") != "silu":
        raise HFModelError(f"{source}: hidden_act {data['hidden_act']!r} is not supported; expected 'silu'")
    theta, scaling = _rope_from_hf(data, source)
    try:
        num_heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        max_positions = int(data.get("max_position_embeddings", 2048))
        # Mistral's window always applies; Qwen's only when use_sliding_window says so (their configs
        # carry a sliding_window value either way).
        slides = family.sliding_window_caps_context or bool(data.get("use_sliding_window"))
        window = data.get("sliding_window") if slides else None
        if window is not None and int(window) < max_positions:
            # Within the window sliding attention *is* full causal attention: cap the context there.
            log.info("%s: sliding_window %s < max_position_embeddings %s; capping the context at the window",
                     source, window, max_positions)
            max_positions = int(window)
        return ModelConfig(
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(data.get("num_key_value_heads") or num_heads),
            head_dim=int(data.get("head_dim") or hidden // num_heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            max_position_embeddings=max_positions,
            family=family.name,
        )
    except KeyError as e:
        raise HFModelError(f"{source}: missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise HFModelError(f"{source}: {e}") from None
        raise HFModelError(f"{source}: a size field is not a number ({e})") from None


def config_to_hf(config: ModelConfig, *, torch_dtype: str, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None) -> dict[str, Any]:
    """A config.json of `config`'s family (LlamaForCausalLM, Qwen2ForCausalLM...), readable by transformers
    4.x and 5.x."""
    family = families.by_name(config.family)
    data: dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    data.update(family.hf_config_extras)
    if config.rope_scaling is not None:
        s = config.rope_scaling
        data["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return data


def read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, raw config.json dict) of a HF model directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFModelError(
            f"{directory} has no config.json; expected a Hugging Face model directory (config.json + "
            f"*.safetensors + tokenizer files), a .gguf file, a cairl run directory or a registry name"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFModelError(f"{path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise HFModelError(f"{path}: expected a JSON object")
    return config_from_hf(data, str(path)), data


# -- weights ------------------------------------------------------------------------------------------

def hf_names(config: ModelConfig) -> dict[str, ParamPath]:
    """HF tensor name -> our parameter path, for every weight `config` has (lm_head only when untied)."""
    return families.by_name(config.family).hf_names(config.num_layers, config.tie_embeddings)


def _hf_shape(path: ParamPath, config: ModelConfig) -> tuple[int, ...]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    if path[-2:] in (("q_norm", "scale"), ("k_norm", "scale")):
        return (h,)  # Qwen3's per-head norms: one head_dim vector
    return {
        "embed_VxD": (v, d), "lm_head_DxV": (v, d), "scale": (d,),
        "q_DxNxH": (n * h, d), "k_DxKxH": (k * h, d), "v_DxKxH": (k * h, d), "o_NxHxD": (d, n * h),
        "gate_DxF": (f, d), "up_DxF": (f, d), "down_FxD": (d, f),
        "q_bias_NxH": (n * h,), "k_bias_KxH": (k * h,), "v_bias_KxH": (k * h,),
    }[path[-1]]


def hf_to_ours(path: ParamPath, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One HF tensor ([out, in] Linear layout) in our layout for parameter `path`."""
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.resolved_head_dim
    leaf = path[-1]
    if leaf in ("embed_VxD", "scale"):
        return w
    if leaf == "q_bias_NxH":
        return w.reshape(n, h)
    if leaf in ("k_bias_KxH", "v_bias_KxH"):
        return w.reshape(k, h)
    if leaf == "q_DxNxH":
        return w.T.reshape(d, n, h)
    if leaf in ("k_DxKxH", "v_DxKxH"):
        return w.T.reshape(d, k, h)
    if leaf == "o_NxHxD":
        return w.T.reshape(n, h, d)
    return w.T  # gate, up, down, lm_head: plain transposes


def ours_to_hf(path: ParamPath, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Inverse of `hf_to_ours`: our parameter back in HF's [out, in] layout (C-contiguous)."""
    leaf = path[-1]
    if leaf in ("embed_VxD", "scale"):
        return np.ascontiguousarray(w)
    if leaf in ("q_bias_NxH", "k_bias_KxH", "v_bias_KxH"):
        return np.ascontiguousarray(w.reshape(-1))
    if leaf in ("q_DxNxH", "k_DxKxH", "v_DxKxH"):
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    if leaf == "o_NxHxD":
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
    return np.ascontiguousarray(w.T)


# Tensors some checkpoints carry that hold nothing we need (recomputed buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig, source: str) -> Params:
    """Our flat params from HF-named tensors of `config.family`; missing, unexpected or mis-shaped tensors raise."""
    names = hf_names(config)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise HFModelError(
            f"{source}: {len(missing)} weights are missing, e.g. {missing[:3]}; the checkpoint does not match "
            f"its config.json ({config.num_layers} layers, tie_word_embeddings={config.tie_embeddings})"
        )
    tied_head = config.tie_embeddings and "lm_head.weight" in tensors
    unexpected = [n for n in tensors if n not in names and not _IGNORED.match(n) and not (tied_head and n == "lm_head.weight")]
    if unexpected:
        raise HFModelError(
            f"{source}: unexpected weights {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; cairl's "
            f"{config.family} model has no such parameters (biases? a different architecture?)"
        )
    params: Params = {}
    for name, path in names.items():
        w = tensors[name]
        expected = _hf_shape(path, config)
        if tuple(w.shape) != expected:
            raise HFModelError(f"{source}: weight {name} has shape {tuple(w.shape)}, config.json implies {expected}")
        params[path] = hf_to_ours(path, w, config)
    return params


def params_to_hf(params: Mapping[ParamPath, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named tensors, in HF's order, from our flat params."""
    return {name: ours_to_hf(path, np.asarray(params[path]), config) for name, path in hf_names(config).items()}


def weight_files(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFModelError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict):
            raise HFModelError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = {name: safetensors_io.contained_file(directory, file, index) for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise HFModelError(f"{index} names the shard {path.name}, which is not in {directory}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        header = safetensors_io.read_header(single)
        return {name: single for name in header}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")) or list(directory.glob("*.pth")):
        raise HFModelError(
            f"{directory} holds only pickle weights (*.bin/*.pt), which cairl never loads (they can run code); "
            f"convert them to safetensors first (transformers: save_pretrained(..., safe_serialization=True))"
        )
    raise HFModelError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; expected safetensors weights")


def check_weight_headers(directory: Path, config: ModelConfig) -> None:
    """Every weight `config` needs is in the safetensors headers with its shape, and every file is as long as
    its header says (a cut-off download fails here), without reading any tensor data."""
    headers: dict[str, dict] = {}
    for path in sorted(set(weight_files(directory).values())):
        headers.update(safetensors_io.read_header(path))
    for name, path in hf_names(config).items():
        if name not in headers:
            raise HFModelError(f"{directory}: weight {name} is missing; the checkpoint does not match its config.json "
                               f"({config.num_layers} layers, tie_word_embeddings={config.tie_embeddings})")
        if tuple(headers[name]["shape"]) != _hf_shape(path, config):
            raise HFModelError(f"{directory}: weight {name} has shape {tuple(headers[name]['shape'])}, config.json "
                               f"implies {_hf_shape(path, config)}")


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory's safetensors file(s), by HF name."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(directory).items():
        by_file.setdefault(path, []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for path, names in by_file.items():
        header = safetensors_io.read_header(path)
        absent = [n for n in names if n not in header]
        if absent:
            raise HFModelError(f"{path}: the index says it holds {absent[:3]}, but it does not")
        tensors.update(safetensors_io.load(path, names))
    return tensors


def parse_size(text: str) -> int:
    """Bytes in a size like '2GB', '500MB', '1GiB' or '12345' (decimal units, as transformers reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise HFModelError(f"max shard size {text!r} is not a size; expected e.g. '2GB', '500MB' or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise HFModelError(f"max shard size {text!r} must be positive")
    return size


def write_weights(directory: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000i-of-0000N.safetensors + index when too big.

    Shards are filled greedily in tensor order; a tensor larger than the limit gets a shard of its own.
    """
    shards: list[dict[str, np.ndarray]] = [{}]
    current = 0
    for name, array in tensors.items():
        if shards[-1] and current + array.nbytes > max_shard_bytes:
            shards.append({})
            current = 0
        shards[-1][name] = array
        current += array.nbytes
    metadata = {"format": "pt"}  # transformers checks for this key
    if len(shards) == 1:
        safetensors_io.save(directory / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors_io.save(directory / file, shard, metadata)
        files.append(file)
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*files, INDEX_FILE]
