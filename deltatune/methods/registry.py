"""The one list of methods, what each supports, and the one way to build a method's config.

Everything the rest of the code asks about a method is a field of its `MethodEntry`: `train` takes its
default learning rate, `compare` its list of methods and latency variants, `serve` whether it can share a
mixed batch (and a decode batch), `generate(tasks=...)` whether its rows mix there, `export` and the peft reader
its translation to Hugging Face PEFT's format, the tests their matrix; every refusal that names the methods
able to do something is built from these fields. Adding a method = its own file in `methods/` + one line in
`METHODS` (tests/test_registry_dummy.py adds one that way).

An injector has the signature `inject(model, config, task, state, exclude)`: it adds the method's
components for `task` to `model` (skipping the `exclude`d head modules) with fresh parameters.

`build_config(method, values, source)` turns settings from anywhere (the command line's `-o key=value`
strings, `delta.json`, a peft `adapter_config.json`, Python) into the method's config dataclass, checking
every name and type against the dataclass fields.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from deltatune.errors import ConfigError
from deltatune.formats import peft_methods
from deltatune.formats.peft_methods import PeftTranslation
from deltatune.methods import adapter, bitfit, dora, full, ia3, lora, prefix, prompt, top_layers


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type  # the settings dataclass; its fields' `help` metadata documents each `-o` option
    inject: Callable[..., None]
    mergeable: bool  # merge() can fold it into the base weights (and latency is timed merged too)
    mixable: bool  # examples of its tasks can share a mixed-task batch (`tasks=`, `serve` of a classifier)
    default_lr: float  # AdamW learning rate when none is given (--lr)
    peft: PeftTranslation | None  # how `deltatune export --format peft` writes it and a peft folder reads as it
    updates_base: bool = False  # its delta is the base weights themselves (full fine-tuning): no FSDP,
    # no per-delta latency (it runs at the base model's speed), no serving beside other tasks
    identity_at_init: bool = True  # a fresh delta leaves the output unchanged (prompt tuning's tokens do not)
    # its rows can share `serve`'s decode batch (each prompt is prefilled alone, then the rows decode together)
    mixes_in_decode: bool | None = None  # None: as `mixable`
    # its rows can share one `DeltaModel.generate(tasks=...)` (prefill and every cached step in one batch)
    mixes_in_generate: bool | None = None  # None: as `mixes_in_decode`

    def __post_init__(self) -> None:
        if self.mixes_in_decode is None:
            object.__setattr__(self, "mixes_in_decode", self.mixable)
        if self.mixes_in_generate is None:
            object.__setattr__(self, "mixes_in_generate", self.mixes_in_decode)


METHODS: dict[str, MethodEntry] = {entry.name: entry for entry in [
    # learning rates as commonly used for each method, AdamW:
    # full: BERT/RoBERTa fine-tuning (Devlin et al. 2019; Liu et al. 2019)
    MethodEntry("full", full.FullFineTune, full.inject, mergeable=True, mixable=False, default_lr=2e-5, peft=None,
                updates_base=True),
    # lora: Hu et al. 2021, RoBERTa-base GLUE (appendix D): 4e-4 .. 5e-4
    MethodEntry("lora", lora.LoRA, lora.inject, mergeable=True, mixable=True, default_lr=5e-4,
                peft=peft_methods.LORA),
    # adapter: Houlsby et al. 2019 §3.1 swept 3e-5 .. 3e-3; 1e-3 is the usual pick
    MethodEntry("adapter", adapter.Adapter, adapter.inject, mergeable=False, mixable=True, default_lr=1e-3,
                peft=None),
    # bitfit: Zaken et al. 2021 (BitFit) used 1e-4 .. 1e-3, higher than full fine-tuning
    MethodEntry("bitfit", bitfit.BitFit, bitfit.inject, mergeable=True, mixable=True, default_lr=1e-3, peft=None),
    # prompt: prompt tuning needs large rates (Lester et al. 2021 §3 used 0.3 with Adafactor)
    MethodEntry("prompt", prompt.PromptTuning, prompt.inject, mergeable=False, mixable=True, default_lr=3e-2,
                peft=peft_methods.PROMPT_TUNING, identity_at_init=False),
    # top_layers: the same pretrained weights as full fine-tuning train, so its rate (not tuned); its per-task
    # copies of the top blocks replace base weights (FSDP cannot shard them, latency is the base model's); a mixed
    # pass splits the top blocks by task but does not write their keys/values into a shared cache: no mixed decoding
    MethodEntry("top_layers", top_layers.TopLayers, top_layers.inject, mergeable=True, mixable=True,
                default_lr=2e-5, peft=None, updates_base=True, mixes_in_decode=False),
    # prefix: measured on MiniLM SST-2, 300 steps of 32 (docs/results/prefix_vs_prompt.md): through the MLP
    # (Li & Liang 2021 section 4.3) 1e-3 reaches 80.05% dev, 3e-2 stays at the majority class (50.92%); its own
    # generate starts the cache from one task's prefixes, so rows of several tasks do not share one generate call
    MethodEntry("prefix", prefix.PrefixTuning, prefix.inject, mergeable=False, mixable=True, default_lr=1e-3,
                peft=peft_methods.PREFIX_TUNING, identity_at_init=False, mixes_in_generate=False),
    # dora: LoRA's A, B and rate (not tuned separately here), plus a magnitude per output (Liu et al. 2024)
    MethodEntry("dora", dora.DoRA, dora.inject, mergeable=True, mixable=True, default_lr=5e-4,
                peft=peft_methods.DORA),
    # ia3: the T-Few recipe trained (IA)³ at 3e-3 (Liu et al. 2022 §3.5, with Adafactor)
    MethodEntry("ia3", ia3.IA3, ia3.inject, mergeable=True, mixable=True, default_lr=3e-3, peft=peft_methods.IA3),
]}


def methods_that(can: str) -> list[str]:
    """The methods whose entry's flag `can` is true ("mixable", "mixes_in_decode", ...) or which have a `peft`
    translation ("peft"), in the registry's order: what a refusal names as the alternatives."""
    return [name for name, entry in METHODS.items() if getattr(entry, can)]


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; the methods are {sorted(METHODS)}")
    return METHODS[name]


def method_of(config) -> str:
    for name, entry in METHODS.items():  # the exact class first: a DoRA config is a LoRA config too
        if type(config) is entry.config:
            return name
    for name, entry in METHODS.items():
        if isinstance(config, entry.config):
            return name
    raise TypeError(f"{type(config).__name__} is not a deltatune method config; use one of {sorted(METHODS)}")


# ---- one config builder -------------------------------------------------------------------------------
def build_config(method: str, values: dict[str, Any], source: str = "settings", strings: bool = False):
    """`method`'s config from `values`, every name and type checked against the config's fields.

    Values (from JSON, Python) must have the field's type (an int is a float too). With `strings=True` (the
    command line's `-o key=value`) a string is parsed by the field's type instead: booleans accept
    true/false/yes/no/1/0, ints and floats their numbers, lists comma-separated items (or JSON), `X | None`
    also none/null. A wrong name or type is a `ConfigError` naming `source`, the field, the value and the
    type expected."""
    if method not in METHODS:
        raise ConfigError(f"{source}: unknown method {method!r}; the methods are {sorted(METHODS)}")
    config_class = METHODS[method].config
    hints = typing.get_type_hints(config_class)
    known = [f.name for f in fields(config_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: {method} has no setting(s) {unknown}; its settings are {known}")
    parsed = {}
    for name, value in values.items():
        try:
            parsed[name] = _parse(value, hints[name], strings)
        except (ValueError, TypeError):
            raise ConfigError(f"{source}: {method} setting {name!r} must be {_type_name(hints[name])}, "
                              f"not {value!r:.80}") from None
    try:
        return config_class(**parsed)
    except (TypeError, ValueError) as error:  # the config's own checks (a rank < 1, an unknown init...)
        raise ConfigError(f"{source}: {error}") from None


def options_from_strings(method: str, pairs: dict[str, str], source: str = "-o") -> dict[str, Any]:
    """Command-line settings {"r": "8", "use_rslora": "no"} -> typed {"r": 8, "use_rslora": False}, checked
    by `build_config` (only the names given: the rest keep their defaults)."""
    config = build_config(method, pairs, source, strings=True)
    return {name: getattr(config, name) for name in pairs}


def typed_value(value: Any, hint: Any, what: str) -> Any:
    """`value` (from a config file, or a string as typed) checked against the type annotation `hint`, strings parsed
    as `build_config(strings=True)` does; a `ConfigError` naming `what` and the type expected otherwise."""
    try:
        return _parse(value, hint, strings=True)
    except (ValueError, TypeError):
        raise ConfigError(f"{what} must be {_type_name(hint)}, not {value!r:.80}") from None


def _parse(value: Any, hint: Any, strings: bool) -> Any:
    """`value` as the type `hint` (parsed from a string if `strings`); ValueError/TypeError if it is not one."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if strings and isinstance(value, str) and type(None) in options and value.lower() in ("none", "null"):
            return None
        # a string that does not look like a list stays a string where the field takes one (`targets`:
        # "query" is a regex, "query,value" the list of suffixes)
        listish = not isinstance(value, str) or value.startswith("[") or "," in value
        tried = [o for o in options if o is not type(None) and o is not str
                 and (listish or str not in options or typing.get_origin(o) is not list)]
        for option in tried + ([str] if str in options else []):
            try:
                return _parse(value, option, strings)
            except (ValueError, TypeError):
                continue
        raise ValueError(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if strings and isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise TypeError(value)
        return [_parse(v, item, strings) for v in value]
    if hint is bool:
        if strings and isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if hint in (int, float):
        if strings and isinstance(value, str):  # 16 stays an int in a float field, as JSON reads it back
            try:
                return int(value)
            except ValueError:
                if hint is int:
                    raise
                return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or (hint is int and isinstance(value, float)):
            raise TypeError(value)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(value)
    return value  # an annotation this check does not know: the config's own checks apply


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "none"
    if hint is bool:
        return "a boolean (true/false/yes/no/1/0)"
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item, _type_name(item))
        return f"a list of {plural} (comma-separated)"
    return {int: "an integer", float: "a number", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))
