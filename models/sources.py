"""Everywhere a model is named: resolve the name, read its weights, and build it (sharded if asked).

Accepted sources, tried in this order:
  * a registry name (`smollm2-135m-instruct`): fetched into the cache on first use (models/fetch.py);
  * a `.gguf` file (llama, qwen2 or qwen3 architecture, any quantization `gguf` can dequantize);
  * a Hugging Face model directory (config.json + model.safetensors or sharded with an index);
  * a cairl run directory: its `hf/` export;
  * a local name: a HF model directory the user placed at $CAIRL_CACHE/models/<name>/ (e.g. a Qwen
    checkpoint copied there as `qwen2.5-0.5b-instruct`); never downloaded.

    loaded = load("smollm2-135m-instruct")                       # LoadedModel(config, model, tokenizer, source)
    ckpt = load_checkpoint(path)                                  # host-side config + numpy params + tokenizer
    value = build_module(lambda: ScalarModel(cfg, nnx.Rngs(0), rules), params, rules)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import fetch, hf_io
from models.config import ModelConfig
from models.errors import UserError
from models.hf_io import ParamPath, Params
from models.llama import Llama
from models.sharding import MeshRules, state_shardings
from models.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer

log = logging.getLogger(__name__)


class ModelSourceError(UserError, ValueError):
    """A model source that names nothing we can load."""


@dataclasses.dataclass
class Checkpoint:
    """A model's weights on the host, before any device placement."""

    config: ModelConfig
    params: Params  # our layout (models/hf_io.py), numpy, as stored (fp32 for the embedded model)
    tokenizer: Tokenizer
    source: str  # what the user named
    path: Path  # the file or directory actually read


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    model: Llama
    tokenizer: Tokenizer
    source: str


def _describe_sources() -> str:
    return (f"expected a registry name ({', '.join(sorted(fetch.EMBEDDED))}), a Hugging Face model directory, "
            f"a .gguf file or a cairl run directory")


def resolve(source: str) -> tuple[str, Path]:
    """('hf' | 'gguf', path) for a source string; fetches registry models on first use."""
    if source in fetch.EMBEDDED:
        return "hf", fetch.fetch_embedded(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise ModelSourceError(f"model {source!r} is a file but not a .gguf file; {_describe_sources()}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()):
            if (path / "hf" / "config.json").is_file():
                return "hf", path / "hf"
            raise ModelSourceError(
                f"{path} is a cairl run directory without an hf/ export yet; it appears once the run finishes "
                f"its export stage (or run `cairl export` on it), then name {path} again"
            )
        hf_io.read_config(path)  # raises the "no config.json" error with its explanation
    if "/" in source or source.endswith(".gguf") or source.startswith("."):
        raise ModelSourceError(f"model {source!r}: no such file or directory; {_describe_sources()}")
    local = _local_model_dir(source)  # after paths: a directory named like this here is what the user meant
    if local is not None:
        return "hf", local
    models = fetch.cache_root() / "models"
    local_names = sorted(p.parent.name for p in models.glob("*/config.json") if p.parent.name not in fetch.EMBEDDED)
    raise ModelSourceError(
        f"unknown model name {source!r}; known models: {', '.join(sorted(fetch.EMBEDDED) + local_names)} (a Hugging "
        f"Face model directory placed at {models / source} is known by that name; or give a path to a "
        f"Hugging Face model directory, a .gguf file or a cairl run directory)"
    )


def _local_model_dir(name: str) -> Path | None:
    """$CAIRL_CACHE/models/<name> when it holds a HF model directory and `name` is a plain name."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    directory = fetch.cache_root() / "models" / name
    return directory if (directory / "config.json").is_file() else None


def load_checkpoint(source: str) -> Checkpoint:
    """Config, host params and tokenizer of `source` (see the module docstring for what it may be)."""
    kind, path = resolve(source)
    if kind == "gguf":
        from models.gguf_io import read_gguf
        from models.tokenizer import tokenizer_from_gguf

        config, tensors, reader = read_gguf(path)
        tokenizer = tokenizer_from_gguf(reader, source=str(path))
    else:
        config, _ = hf_io.read_config(path)
        tensors = hf_io.read_weights(path)
        tokenizer = load_tokenizer(path)
    check_vocab_fits(tokenizer, config.vocab_size, source=str(path))
    params = hf_io.params_from_hf(tensors, config, str(path))
    return Checkpoint(config=config, params=params, tokenizer=tokenizer, source=source, path=path)


def _flat_paths(state) -> list[tuple[ParamPath, nnx.Variable]]:
    return list(nnx.to_flat_state(state))


def build_module(factory: Callable[[], nnx.Module], params: Mapping[ParamPath, np.ndarray],
                 mesh_rules: MeshRules | None = None, *, source: str = "checkpoint") -> nnx.Module:
    """`factory()`'s module with every parameter set from `params` (keyed by the module's own state paths).

    Shapes come from an abstract evaluation; each numpy array goes straight to its devices in its
    final layout (`jax.device_put` with the parameter's NamedSharding slices on the host), so no
    device ever holds a replicated copy of a sharded weight.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    shardings = None if mesh_rules is None else dict(_flat_paths(state_shardings(abstract_state, mesh_rules)))
    expected = _flat_paths(abstract_state)
    missing = [p for p, _ in expected if p not in params]
    if missing:
        raise ModelSourceError(f"{source}: no weights for {['.'.join(map(str, p)) for p in missing[:4]]}")
    leaves = []
    for path, variable in expected:
        array = np.asarray(params[path])
        if tuple(array.shape) != tuple(variable.shape):
            raise ModelSourceError(
                f"{source}: weight {'.'.join(map(str, path))} has shape {array.shape}, the model expects {variable.shape}"
            )
        array = array.astype(jnp.dtype(variable.dtype), copy=False)
        placed = jax.device_put(array) if shardings is None else jax.device_put(array, shardings[path])
        leaves.append((path, variable.replace(placed)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def build_llama(config: ModelConfig, params: Mapping[ParamPath, np.ndarray], mesh_rules: MeshRules | None = None,
                *, source: str = "checkpoint") -> Llama:
    return build_module(lambda: Llama(config, nnx.Rngs(0), mesh_rules), params, mesh_rules, source=source)


def load(source: str, *, mesh_rules: MeshRules | None = None, dtype: str | None = None) -> LoadedModel:
    """Load `source` as a Llama (compute dtype `dtype` if given), placed on `mesh_rules`' mesh if given."""
    ckpt = load_checkpoint(source)
    config = ckpt.config if dtype is None else ckpt.config.replace(dtype=dtype)
    model = build_llama(config, ckpt.params, mesh_rules, source=str(ckpt.path))
    return LoadedModel(config=config, model=model, tokenizer=ckpt.tokenizer, source=source)


def model_params(model: nnx.Module) -> Params:
    """Flat numpy params of a (possibly sharded) model, gathered to the host: the inverse of build_module."""
    return host_params(nnx.state(model, nnx.Param))


def host_params(state: nnx.State) -> Params:
    """Flat numpy copy of an nnx parameter state (possibly sharded over many devices), keyed by path."""
    return {path: np.asarray(jax.device_get(variable[...])) for path, variable in _flat_paths(state)}
