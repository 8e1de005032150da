"""The one place methods are listed: name -> (config class, injector).

An injector has the signature `inject(model, config, task, state, exclude)`: it adds the method's
components for `task` to `model` (skipping the `exclude`d head modules) with fresh parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from deltatune.methods import adapter, bitfit, full, lora, prompt, top_layers


@dataclass(frozen=True)
class MethodEntry:
    config: type
    inject: Callable[..., None]
    mergeable: bool


METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry(lora.LoRA, lora.inject, mergeable=True),
    "bitfit": MethodEntry(bitfit.BitFit, bitfit.inject, mergeable=True),
    "full": MethodEntry(full.FullFineTune, full.inject, mergeable=True),
    "adapter": MethodEntry(adapter.Adapter, adapter.inject, mergeable=False),
    "prompt": MethodEntry(prompt.PromptTuning, prompt.inject, mergeable=False),
    "top_layers": MethodEntry(top_layers.TopLayers, top_layers.inject, mergeable=True),
}


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(method: str, values: dict[str, Any]):
    """Rebuild a config dataclass from delta.json, refusing fields it does not have."""
    config_class = method_entry(method).config
    known = {f.name for f in fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{method} config has no field(s) {sorted(unknown)}; known: {sorted(known)}")
    return config_class(**values)


def method_of(config) -> str:
    for name, entry in METHODS.items():
        if isinstance(config, entry.config):
            return name
    raise TypeError(f"{type(config).__name__} is not a deltatune method config; use one of {sorted(METHODS)}")
