"""Device selection: CUDA when present and asked for, CPU otherwise."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is available")
    if name.startswith("cuda") or name == "cpu":
        return torch.device(name)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
