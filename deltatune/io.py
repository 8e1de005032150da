"""Deltas on disk: `delta.safetensors` (only the task's parameters) + `delta.json` (what they are).

Nothing here unpickles: safetensors holds raw tensors and JSON holds the description, so loading a
delta someone sent you cannot run code. Saves are atomic: the folder is written under a temporary
name next to its destination and renamed into place, so an interrupted save never leaves a
half-written delta and never loses the one that was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.errors import DeltaError

FORMAT = "deltatune-delta"
FORMAT_VERSION = 1
WEIGHTS_FILE = "delta.safetensors"
META_FILE = "delta.json"


def shape_fingerprint(named_shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the base model's parameter names and shapes: same architecture and size or not."""
    digest = hashlib.sha256()
    for name in sorted(named_shapes):
        digest.update(f"{name}:{tuple(named_shapes[name])};".encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(named_tensors: dict[str, torch.Tensor], sample: int = 64) -> str | None:
    """Hash of a few values of every base parameter: tells two checkpoints of one architecture apart.

    None when the weights are not materialised (a model built on the meta device).
    """
    digest = hashlib.sha256()
    for name in sorted(named_tensors):
        tensor = named_tensors[name]
        if tensor.is_meta:
            return None
        values = tensor.detach().reshape(-1)[:sample].to(torch.float32).cpu()
        digest.update(name.encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (the old one survives
    until the new one is complete, and is put back if the swap fails); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise DeltaError(f"{path} exists and is not a folder; choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if path.exists():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, backup)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(backup, path)  # put the previous folder back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_delta(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a delta folder atomically (see `atomic_folder`)."""
    with atomic_folder(path) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a delta folder: (tensors, metadata). Refuses pickles and anything malformed."""
    path = Path(path)
    if not path.is_dir():
        raise DeltaError(f"no delta at {path}: expected a folder with {WEIGHTS_FILE} and {META_FILE}")
    weights, meta_file = path / WEIGHTS_FILE, path / META_FILE
    if not weights.is_file() or not meta_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
        hint = (
            f" It holds {pickles}: pickle files can run code when loaded, so deltatune does not read them."
            if pickles
            else ""
        )
        raise DeltaError(f"{path} is not a deltatune delta (needs {WEIGHTS_FILE} and {META_FILE}).{hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeltaError(f"{meta_file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeltaError(f"{meta_file} is not a deltatune delta description (format != {FORMAT!r})")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise DeltaError(f"{weights} is not a readable safetensors file: {error}") from error
    return tensors, meta
