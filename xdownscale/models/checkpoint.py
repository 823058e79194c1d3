"""Checkpoints of the trainers: optimiser state as flat safetensors tensors plus JSON, and the latest
complete checkpoint of a run (``out/checkpoints/step-NNNNNNNN/`` with its ``state.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "flatten_optimizer", "latest_checkpoint", "unflatten_optimizer"]

#: format tag of the checkpoints' state.json
CHECKPOINT_FORMAT = "xdownscale-checkpoint/1"


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def latest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    done = (
        sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file())
        if root.is_dir()
        else []
    )
    return done[-1] if done else None
