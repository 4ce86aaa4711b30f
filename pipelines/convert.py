"""Moving answers and model outputs across process boundaries: tensors <-> numpy, answers -> plain Python."""

from __future__ import annotations

import numpy as np
import torch


def outputs_to_numpy(outputs: dict) -> dict:
    """Model outputs as numpy arrays (cheap to pickle; bfloat16, which numpy lacks, widened to float32)."""
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() if isinstance(v, torch.Tensor) else v
        for k, v in outputs.items()
    }


def outputs_to_torch(outputs: dict) -> dict:
    return {
        k: torch.from_numpy(v if v.flags.writeable else v.copy()) if isinstance(v, np.ndarray) else v
        for k, v in outputs.items()
    }


def to_plain(value):
    """Tensors and numpy values as Python lists and numbers: what JSON and Arrow take."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
