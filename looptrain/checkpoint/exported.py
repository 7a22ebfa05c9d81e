"""An exported model: `model.safetensors` + `model_config.json`, nothing else.

The export is for use outside training: evaluation, sharing, inference. It
holds the bare `LoopedLM` state dict under clean names (no wrapper or
train-module prefixes, a tied embedding stored once) in safetensors, which
cannot carry code, and the `ModelConfig` as JSON. Loading needs PyTorch,
safetensors and `looptrain.model` only:

    from looptrain.checkpoint.exported import load_exported
    model = load_exported("exported/")      # a LoopedLM in eval mode
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from looptrain.config.schema import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
EXPORT_FORMAT = "looptrain-model"


def save_exported(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write weights and config into out_dir (created if needed); returns out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    config = {"format": EXPORT_FORMAT, "model": dataclasses.asdict(cfg)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def read_model_config(out_dir: str | os.PathLike) -> ModelConfig:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; make an export with `looptrain export CKPT OUT`")
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = data.get("model", {}) if data.get("format") == EXPORT_FORMAT else {}
    unknown = sorted(set(values) - fields)
    if not values or unknown:
        why = f"unknown keys {unknown}" if unknown else "no model section"
        raise ValueError(f"{path}: not a looptrain model config ({why}); re-export with this looptrain version")
    return ModelConfig(**values)


def load_exported(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> "torch.nn.Module":
    """The exported LoopedLM with its weights, in eval mode."""
    from safetensors.torch import load_file

    from looptrain.model import LoopedLM

    cfg = read_model_config(out_dir)
    weights = Path(out_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; make an export with `looptrain export CKPT OUT`")
    model = LoopedLM(cfg)
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(device).eval()
