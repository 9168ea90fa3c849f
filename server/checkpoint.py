"""Trainer checkpoints: one safetensors file (tensors) + JSON metadata in its header. No pickle.

Tensors, by prefix: ``learner.*`` / ``generator.*`` (state dicts), ``opt.<name>.<param index>.<key>``
(optimiser state, e.g. Adam's step / exp_avg / exp_avg_sq), ``bank.<i>`` (memory-bank rings),
``rng.<name>`` (``torch.Generator.get_state()`` as uint8). The header's ``__metadata__`` holds
``free_dfml_checkpoint``: a JSON document with the iteration, config, history, memory-bank layout
and anything else JSON-able. Written with temp file + fsync + rename, so a crash leaves either the
old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from free_dfml.common.files import atomic_write_bytes

META_KEY = "free_dfml_checkpoint"
FORMAT = "free-dfml/trainer-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # a non-finite checkpoint would poison every resume and evaluation: refuse it, keep the last one
    bad = sorted(k for k, v in clean.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"refusing to write a non-finite checkpoint: {len(bad)} of {len(clean)} "
                              f"tensors hold NaN/inf (first: {bad[0]})")
    doc = {"format": FORMAT, "version": VERSION, **meta}
    atomic_write_bytes(path, st_save(clean, metadata={META_KEY: json.dumps(doc)}))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        doc = json.loads(header["__metadata__"][META_KEY])
    except Exception as e:  # noqa: BLE001 - any failure means "not a checkpoint of ours"
        raise CheckpointError(f"{path} is not a readable free-dfml checkpoint: {e}") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {doc.get('format')!r} "
                              f"version {doc.get('version')!r}")
    return tensors, doc


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_tensors(opt: torch.optim.Optimizer, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's per-parameter state as flat tensors + JSON info for non-tensor entries."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{name}.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def load_optimizer(opt: torch.optim.Optimizer, name: str, tensors: dict[str, torch.Tensor],
                   info: dict) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    p = f"opt.{name}."
    for k, v in tensors.items():
        if k.startswith(p):
            idx, key = k[len(p):].split(".", 1)
            state.setdefault(int(idx), {})[key] = v.clone()
    for idx, d in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for cur, saved in zip(sd["param_groups"], info.get("param_groups", sd["param_groups"])):
        g = dict(cur)
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(cur.get(k), tuple) else v
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensor(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def set_rng(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(torch.uint8).cpu())
