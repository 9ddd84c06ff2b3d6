"""Write LoRA adapters alone in the layout `peft` loads onto the base model (`PeftModel.from_pretrained`).

    out/adapter_config.json          peft_type LORA: r, lora_alpha, lora_dropout, target_modules
    out/adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
    out/.cairl-export                marker (see models/export.atomic_directory)

PEFT computes a Linear's output as x Wᵀ + (alpha / r) · x Aᵀ Bᵀ with A = lora_A.weight and B = lora_B.weight,
so our A [*in, r] is written as A.reshape(in, r)ᵀ and our B [r, *out] as B.reshape(r, out)ᵀ; the flattening
of in/out dims (N×H for attention heads) is the one models/hf_io.py uses for the weights themselves.
`target_modules` lists the full names of the adapted modules, which PEFT matches exactly.

A stage that trained adapters on weights an earlier LoRA stage produced (PPO after SL: W + s·A₁B₁) is
written `stacked` on the earlier adapter, so that it goes on the original base: W + s·(A₁B₁ + A₂B₂) is one
adapter of rank 2r, A = [A₁; A₂], B = [B₁ B₂], with lora_alpha doubled to keep the scale alpha / r.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models import safetensors_io
from models.errors import UserError
from models.export import EXPORT_DTYPES, ExportError, atomic_directory
from models.hf_io import ParamPath
from models.lora import LoraSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(trainable: Mapping[ParamPath, np.ndarray], spec: LoraSpec) -> dict[str, np.ndarray]:
    """PEFT-named lora_A / lora_B tensors from a LoRA train state's host params (models.sources.host_params)."""
    tensors = {}
    for path, module in spec.targets:
        a_IxR, b_RxO = np.asarray(trainable[path + ("lora_a",)]), np.asarray(trainable[path + ("lora_b",)])
        rank = a_IxR.shape[-1]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a_IxR.reshape(-1, rank).T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b_RxO.reshape(rank, -1).T)
    return tensors


def adapter_config(spec: LoraSpec, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.config.rank,
        "lora_alpha": spec.config.alpha,
        "lora_dropout": spec.config.dropout,
        "target_modules": [module for _, module in spec.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def stack(earlier: Path, tensors: Mapping[str, np.ndarray], config: dict) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter_config) of the adapter `tensors`/`config` stacked on the PEFT adapter directory
    `earlier` (see the module docstring); both must adapt the same modules with the same rank and alpha."""
    try:
        prior_config = json.loads((earlier / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the earlier adapter {earlier / ADAPTER_CONFIG}: {e}") from None
    same = ("r", "lora_alpha", "target_modules")
    if any(prior_config.get(key) != config[key] for key in same):
        raise UserError(f"the adapter in {earlier} has {', '.join(f'{k}={prior_config.get(k)!r}' for k in same)}; "
                        f"a later stage's adapter can be stacked on it only with the same values, got "
                        f"{', '.join(f'{k}={config[k]!r}' for k in same)}")
    prior = safetensors_io.load(earlier / ADAPTER_WEIGHTS)
    stacked = {}
    for name, w in tensors.items():
        axis = 0 if name.endswith("lora_A.weight") else 1  # A: [r, in] stacks rows, B: [out, r] columns
        stacked[name] = np.concatenate([prior[name].astype(w.dtype), w], axis=axis)
    return stacked, {**config, "r": 2 * config["r"], "lora_alpha": 2 * config["lora_alpha"]}


def export_adapter(out: str | os.PathLike, trainable: Mapping[ParamPath, np.ndarray], spec: LoraSpec, *,
                   base_model: str, stacked_on: Path | None = None, dtype: str = "float32") -> Path:
    """Write the adapters of `trainable` as a PEFT adapter directory at `out`; returns its path.

    `base_model` is recorded as base_model_name_or_path: the directory (or hub name) of the base
    weights the adapter goes on, e.g. a `cairl export` of the initial model. `stacked_on`: the PEFT
    adapter of the stage whose merged weights this one trained on; the result goes on that one's base."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not supported; expected one of {sorted(EXPORT_DTYPES)}")
    tensors, config = peft_tensors(trainable, spec), adapter_config(spec, base_model)
    if stacked_on is not None:
        tensors, config = stack(Path(stacked_on), tensors, config)
    tensors = {name: w.astype(EXPORT_DTYPES[dtype], copy=False) for name, w in tensors.items()}
    with atomic_directory(Path(out)) as tmp:
        try:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ExportError(f"cannot write the adapter to {out}: {e.strerror or e}") from None
        safetensors_io.save(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    return Path(out).absolute()
