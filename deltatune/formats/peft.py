"""Hugging Face PEFT's adapter format: export deltatune deltas to it, and read its adapters as deltas.

A peft adapter folder holds `adapter_config.json` (a `LoraConfig`, `IA3Config`, `PromptTuningConfig` or
`PrefixTuningConfig` as JSON) and `adapter_model.safetensors`. Which methods convert, and how, is each method's
registry entry (`MethodEntry.peft`: a `formats.peft_methods.PeftTranslation`, where the key names, shapes and
exactness arguments are written down); this module reads and writes the folders and refuses, by name, a method
without one. Anything peft can express that deltatune cannot is refused on reading, never loaded approximately.
"""


from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.core.component import TASK_NAME
from deltatune.errors import ConfigError, DeltaError
from deltatune.formats.native import META_FILE, atomic_folder, delta_folder, read_delta, recover
from deltatune.formats.peft_methods import order_experts
from deltatune.methods.registry import METHODS, build_config

PEFT_FORMAT = "peft"  # meta["format"] of a delta read from a peft folder
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

def is_peft_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# ---- deltatune -> peft ---------------------------------------------------------------------------------
def export_peft(source, out_dir: str | os.PathLike, task: str | None = None) -> Path:
    """Write a deltatune delta as a peft adapter folder (`PeftModel.from_pretrained(base, out_dir)`).

    `source` is a delta folder or a DeltaModel (its `task`, default the active one). Raises DeltaError
    when the delta cannot be expressed exactly in peft's format."""
    if isinstance(source, str | os.PathLike):
        tensors, meta = read_delta(source)
    else:  # a DeltaModel: save its delta as usual, then convert that
        with tempfile.TemporaryDirectory() as tmp:
            tensors, meta = read_delta(source.save_delta(Path(tmp) / "delta", task=task))
    method = meta.get("method")
    translation = METHODS[method].peft if method in METHODS else None
    if translation is None:
        exported = [name for name, entry in METHODS.items() if entry.peft is not None]
        raise DeltaError(f"{method} deltas have no peft equivalent that deltatune exports; {exported} do")
    peft_tensors, config = translation.export(tensors, meta, _config(method, meta["config"], "delta.json"))
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in peft_tensors.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


# ---- peft -> deltatune ---------------------------------------------------------------------------------
def read_peft(path: str | os.PathLike, model=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a peft adapter folder as a deltatune delta: (tensors keyed as deltatune keys them, metadata
    with `format` "peft"). Refuses what deltatune cannot compute exactly. `model`, the base it is read for, names
    the expert parameters of peft's nested `target_parameters` wrappers (`peft_methods.order_experts`)."""
    path = Path(path)
    if not is_peft_folder(path):
        raise DeltaError(f"{path} is not a peft adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        peft_config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(path / WEIGHTS_FILE)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as error:
        raise DeltaError(f"{path}: unreadable peft adapter: {error}") from error
    if not isinstance(peft_config, dict):
        raise DeltaError(f"{path / CONFIG_FILE} is not a JSON object")
    kind = peft_config.get("peft_type")
    readers = {}  # peft type -> the first method that reads it (LoRA reads DoRA too: use_dora)
    for entry in METHODS.values():
        if entry.peft is not None:
            readers.setdefault(entry.peft.peft_type, entry.peft.read)
    if kind not in readers:
        raise DeltaError(f"{path}: peft type {kind!r} has no deltatune equivalent ({', '.join(readers)} do)")
    delta, method, settings, head_keys = readers[kind](tensors, peft_config, path)
    if model is not None and settings.get("expert_parameters"):
        delta = order_experts(delta, settings, model)
    config = _config(method, settings, path / CONFIG_FILE)
    meta = {
        "format": PEFT_FORMAT,
        "task": path.name if TASK_NAME.match(path.name) and path.name != "base" else "default",
        "method": method,
        "config": asdict(config),
        "label_names": None,
        "head_keys": head_keys,
        "num_parameters": sum(t.numel() for t in delta.values()),
        "base": None,  # peft records only a name; keys and shapes are checked when the delta is filled in
        "peft_config": peft_config,
    }
    return delta, meta


def _config(method: str, values: dict[str, Any], source) -> Any:
    """`registry.build_config`, its errors as DeltaErrors (the file is what is wrong)."""
    try:
        return build_config(method, values, source=str(source))
    except ConfigError as error:
        raise DeltaError(str(error)) from None


def check_peft_fits(model, meta: dict, path) -> None:
    """Called by DeltaModel.check_base for a peft folder: refuse an adapter deltatune would run differently."""
    entry = METHODS.get(meta.get("method"))
    refusal = entry.peft.refusal(model) if entry is not None and entry.peft is not None else None
    if refusal:
        raise DeltaError(f"{path}: {refusal}")


def read_saved_delta(path: str | os.PathLike, trust_pickle: bool = False,
                     model=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a deltatune delta folder (`io.read_delta`) or of a Hugging Face peft adapter
    folder (`read_peft`: adapter_config.json and no delta.json; `model`: the base it is read for); a training
    run's folder stands for its delta."""
    path = delta_folder(path)
    if not path.exists():
        recover(path)  # a save killed between its two renames left the previous folder as a backup
    if not (path / META_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return read_peft(path, model)
    return read_delta(path, trust_pickle=trust_pickle)
