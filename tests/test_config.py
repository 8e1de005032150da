"""One config builder (`registry.build_config`) for every source of method settings.

Every field of every registered method: a non-default value typed on the command line (`-o key=value`)
comes back equal after training's save (delta.json) and `add_delta`; a wrong type is refused with a message
naming the field, the value and the type expected, from the command line and from delta.json alike.
A method added to the registry is covered with no edit here.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, fields

import pytest
from conftest import make_model

import deltatune
from deltatune.cli import method_settings
from deltatune.errors import ConfigError, DeltaError
from deltatune.methods.registry import METHODS, build_config

NUMBER_TYPES = (int, float)


def non_default(method: str, field) -> tuple[str, object]:
    """(what one types after `-o name=`, the value it must give) for a value other than the default."""
    hint = typing.get_type_hints(METHODS[method].config)[field.name]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    default = field.default if field.default is not MISSING else None
    kind = kinds[0]
    if "choices" in field.metadata:  # one that needs no other setting (init="text" needs a text)
        choice = next(c for c in field.metadata["choices"] if c != default and builds(method, {field.name: c}))
        return choice, choice
    if kind is bool:
        return ("no", False) if default else ("yes", True)
    if kind is int:  # one up, else one down (a tiny model has 2 blocks: top_layers k=2 cannot grow)
        value = default + 1 if builds(method, {field.name: default + 1}) and fits(method, field.name, default + 1) \
            else default - 1
        return str(value), value
    if kind is float:
        return str(default + 0.25), default + 0.25
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return ("5,7", [5, 7]) if item is int else ("query,value", ["query", "value"])
    return "a film I liked", "a film I liked"


def fits(method: str, name: str, value) -> bool:
    """The setting attaches to the tiny BERT model."""
    try:
        deltatune.attach(make_model("bert"), build_config(method, {name: value}), task="t")
        return True
    except deltatune.DeltaTuneError:
        return False


def builds(method: str, values: dict) -> bool:
    try:
        build_config(method, values)
        return True
    except ConfigError:
        return False


# settings that need a mixture of experts, not the tiny BERT these cases attach to: tests/test_lora_experts.py
NEEDS_EXPERTS = {("lora", "expert_parameters"), ("dora", "expert_parameters")}
CASES = [(method, field.name) for method, entry in METHODS.items() for field in fields(entry.config)
         if (method, field.name) not in NEEDS_EXPERTS]


def field_of(method: str, name: str):
    return next(f for f in fields(METHODS[method].config) if f.name == name)


@pytest.mark.parametrize("method,name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_every_setting_round_trips_from_the_command_line_to_a_reloaded_delta(method, name, tmp_path):
    typed, expected = non_default(method, field_of(method, name))
    options = method_settings(method, [f"{name}={typed}"])
    assert options == {name: expected}  # typed from the string, as the field declares
    config = build_config(method, options, source="test")
    assert getattr(config, name) == expected and getattr(METHODS[method].config(), name) != expected
    model = deltatune.attach(make_model("bert"), config, task="t")
    model.save_delta(tmp_path / "delta")
    # a setting that trains in one form and saves in another (LoRA init="pissa": a rank-2r plain LoRA)
    stored = config.saved_config() if hasattr(config, "saved_config") else config
    saved = json.loads((tmp_path / "delta" / "delta.json").read_text())["config"]
    assert saved[name] == getattr(stored, name)
    reloaded = deltatune.load_delta(make_model("bert"), tmp_path / "delta")
    assert reloaded.task_info["t"]["config"] == stored


def bad_string(kind) -> str | None:
    """A command-line string that is not a `kind` (None: every string is one)."""
    if kind is bool:
        return "maybe"
    if kind is int:
        return "8.5"
    if kind is float:
        return "high"
    if typing.get_origin(kind) is list and typing.get_args(kind)[0] in NUMBER_TYPES:
        return "5,x"
    return None


def bad_json(kind):
    """A JSON value that is not a `kind`."""
    if kind is str or (typing.get_origin(kind) is list and typing.get_args(kind)[0] is str):
        return 5
    if typing.get_origin(kind) is list:
        return ["a"]
    return "2"  # a string where a number or a boolean belongs: `r: "2"`, `use_rslora: "no"`


@pytest.mark.parametrize("method,name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_a_setting_of_the_wrong_type_is_refused_by_name_value_and_type(method, name, tmp_path):
    hint = typing.get_type_hints(METHODS[method].config)[name]
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    text = bad_string(kinds[0]) if str not in kinds else None
    if text is not None:
        with pytest.raises(ConfigError) as raised:
            method_settings(method, [f"{name}={text}"])
        assert f"-o: {method} setting {name!r} must be " in str(raised.value)
        assert repr(text) in str(raised.value)

    model = deltatune.attach(make_model("bert"), METHODS[method].config(), task="t")
    model.save_delta(tmp_path / "delta")
    meta_file = tmp_path / "delta" / "delta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"][name] = bad_json(kinds[0])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DeltaError) as raised:
        deltatune.load_delta(make_model("bert"), tmp_path / "delta")
    assert f"delta.json: {method} setting {name!r} must be " in str(raised.value)
    assert repr(meta["config"][name]) in str(raised.value)


def test_use_rslora_no_is_false_and_scales_by_alpha_over_r(tmp_path):
    """The bug this builder fixed: `-o use_rslora=no` was the truthy string "no" (scale alpha/sqrt(r)), and
    the delta it saved was refused on loading."""
    for text, rslora in [("no", False), ("false", False), ("0", False), ("yes", True), ("true", True), ("1", True)]:
        options = method_settings("lora", ["r=4", "alpha=8", f"use_rslora={text}"])
        assert options == {"r": 4, "alpha": 8, "use_rslora": rslora}
        model = deltatune.attach(make_model("bert"), build_config("lora", options), task="t")
        scalings = {c.scaling["t"] for c in model.components().values() if hasattr(c, "scaling")}
        assert scalings == {8 / math.sqrt(4) if rslora else 8 / 4}  # 4.0 vs 2.0
        model.save_delta(tmp_path / text)
        assert deltatune.load_delta(make_model("bert"), tmp_path / text).task_info["t"]["config"].use_rslora is rslora


def test_command_line_strings_are_typed_by_the_field():
    assert method_settings("lora", ["targets=query"]) == {"targets": "query"}  # one string: a regex
    assert method_settings("lora", ["targets=query,value"]) == {"targets": ["query", "value"]}
    assert method_settings("lora", ['targets=["query"]']) == {"targets": ["query"]}  # JSON lists too
    assert method_settings("lora", ["targets=none"]) == {"targets": None}
    assert method_settings("lora", ["alpha=16", "dropout=0.1"]) == {"alpha": 16, "dropout": 0.1}
    assert method_settings("bitfit", ["subset=query"]) == {"subset": ["query"]}  # a list field: one item
    assert method_settings("prompt", ["init_token_ids=5"]) == {"init_token_ids": [5]}
    with pytest.raises(ConfigError, match=r"lora has no setting\(s\) \['rank'\]"):
        method_settings("lora", ["rank=8"])


def test_values_from_json_or_python_are_not_parsed():
    """Only the command line's strings are parsed: in delta.json or Python "8" is not a number."""
    assert build_config("lora", {"r": 8, "alpha": 16}).alpha == 16  # an int is a float
    for values in [{"r": "8"}, {"use_rslora": "yes"}, {"use_rslora": 1}, {"r": True}, {"targets": 5},
                   {"targets": ["query", 5]}, {"dropout": None}]:
        with pytest.raises(ConfigError, match="must be"):
            build_config("lora", values)
