"""Deltas on disk: `delta.safetensors` (only the task's parameters) + `delta.json` (what they are).

Nothing here unpickles unless asked to (`trust_pickle`, and then with torch's weights-only loader):
safetensors holds raw tensors and JSON holds the description, so loading a delta someone sent you
cannot run code. Every problem with a delta on disk is a `DeltaError` that names the file. Saves are
atomic: the folder is written under a temporary name next to its destination and renamed into place,
so an interrupted save never leaves a half-written delta and never loses the one that was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
RUN_DELTA = "delta"  # the delta's folder inside a training run's folder (training.loop saves it there)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# delta.json fields: (check of the JSON value, what it must be)
META_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda value: isinstance(value, str), "a task name"),
    "method": (lambda value: isinstance(value, str), "a method name"),
    "config": (lambda value: isinstance(value, dict), "an object of the method's settings"),
    "label_names": (lambda value: value is None or _is_string_list(value), "null or a list of strings"),
    "head_keys": (_is_string_list, "a list of parameter keys"),
    "base": (lambda value: isinstance(value, dict), "an object describing the base model"),
}


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
    until the new one is complete, and is put back if the swap fails); on error it is removed.

    The swap is two renames (a folder cannot replace a non-empty one in one step): `path` -> backup,
    then temporary -> `path`. A process killed between them leaves no `path`, only its backup; `recover`
    puts that back, and removes what killed saves left (their names carry the writer's process id)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists() and not path.is_dir():
        raise DeltaError(f"{path} exists and is not a folder; choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_folder(tmp)
        if path.exists():
            backup = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            os.rename(path, backup)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(backup, path)  # put the previous folder back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_folder(path.parent)  # the renames themselves survive a power cut
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover(path: str | os.PathLike) -> None:
    """Clean up after saves of `path` that were killed: put back the previous folder if one was killed
    between its two renames (so `path` is missing), and remove their temporary and backup folders.
    Folders of saves still running (their process is alive) are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}."
    left: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        kind, _, rest = entry.name[len(prefix) :].partition("-")  # "tmp-<pid>-<random>" or "old-<pid>-<random>"
        pid = rest.partition("-")[0]
        if kind in left and pid.isdigit() and not _process_alive(int(pid)):
            left[kind].append(entry)
    try:
        if not path.exists() and left["old"]:
            newest = max(left["old"], key=lambda folder: folder.stat().st_mtime)
            os.rename(newest, path)
            left["old"].remove(newest)
    except OSError:  # another process recovered it first, or the folder is read-only
        pass
    for folder in left["tmp"] + left["old"]:
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check: never touch what might be another process's save
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    if os.name == "posix":  # a folder's entries are made durable by fsync on the folder itself
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_delta(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a delta folder atomically (see `atomic_folder`)."""
    with atomic_folder(path) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


def write_delta_into(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a delta's two files (and `extra` safetensors files, {name: tensors}) into `folder`, which may hold
    other files (a transformers.Trainer checkpoint: optimizer, scheduler, RNG). They are written complete by
    `write_delta` in a folder beside it, then each renamed into place: a reader sees every file whole, old or new."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".delta-{os.getpid()}"
    write_delta(staging, tensors, meta)
    try:
        for name, more in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in more.items()}, staging / name)
        for name in [*(extra or {}), WEIGHTS_FILE, META_FILE]:  # delta.json last: it describes the rest
            os.replace(staging / name, folder / name)
        _fsync_folder(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def delta_folder(path: str | os.PathLike) -> Path:
    """The delta folder `path` names: itself, or the delta of a run folder (`deltatune train --out RUN` saves it
    in RUN/delta), so that a run folder is accepted wherever a delta is."""
    path = Path(path)
    if not (path / META_FILE).is_file() and (path / RUN_DELTA / META_FILE).is_file():
        return path / RUN_DELTA
    return path


def read_delta(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a delta folder: (tensors, metadata). Refuses anything malformed with a `DeltaError`.
    (A peft adapter folder is read by `formats.peft.read_saved_delta`, which picks this or `formats.peft.read_peft`.)

    Pickle files are refused unless `trust_pickle`: then a folder holding `delta.json` and, instead of
    `delta.safetensors`, one pickle file (.bin/.pt/.pth/.pkl) of a flat {key: tensor} dict, as
    `torch.save(model.task_parameters())` writes it, is read with `torch.load(weights_only=True)`
    (tensors and plain containers only, yet a larger surface than safetensors: use it for files you trust)."""
    path = delta_folder(path)
    if not path.exists():
        recover(path)  # a save killed between its two renames left the previous folder as a backup
    if not path.is_dir():
        raise DeltaError(f"no delta at {path}: expected a folder with {WEIGHTS_FILE} and {META_FILE}")
    weights, meta_file = path / WEIGHTS_FILE, path / META_FILE
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if trust_pickle and not weights.is_file() and len(pickles) == 1:
        weights = pickles[0]
    if not weights.is_file() or not meta_file.is_file():
        hint = (
            f" It holds {[p.name for p in pickles]}: pickle files can run code when loaded, so deltatune does "
            f"not read them; if you trust this file, pass --trust-pickle (CLI) or trust_pickle=True."
            if pickles and not trust_pickle
            else ""
        )
        raise DeltaError(f"{path} is not a deltatune delta (needs {WEIGHTS_FILE} and {META_FILE}; a run folder of "
                         f"`deltatune train --out RUN` holds its delta in RUN/{RUN_DELTA}).{hint}")
    meta = _read_meta(meta_file)
    tensors = _read_pickle(weights) if weights.suffix in PICKLE_SUFFIXES else _read_safetensors(weights)
    return tensors, meta


def _read_meta(meta_file: Path) -> dict[str, Any]:
    """delta.json, with the fields and JSON types every loader relies on."""
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise DeltaError(f"{meta_file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeltaError(f"{meta_file} is not a deltatune delta description (format != {FORMAT!r})")
    for field, (valid, kind) in META_FIELDS.items():
        if field not in meta:
            raise DeltaError(f"{meta_file} has no {field!r} field ({kind})")
        if not valid(meta[field]):
            raise DeltaError(f"{meta_file}: {field!r} must be {kind}, not {meta[field]!r:.80}")
    return meta


def _read_safetensors(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise DeltaError(f"{weights} is not a readable safetensors file: {error}") from error


def _read_pickle(weights: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's errors have many types (UnpicklingError, EOFError, ...)
        raise DeltaError(f"{weights} is not a loadable tensor pickle: {error}") from error
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise DeltaError(f"{weights} does not hold a flat {{key: tensor}} dict, as a delta's weights must")
    return tensors
