"""Run settings from a YAML file: `deltatune train --config run.yaml` (also `compare` and `serve`).

    # run.yaml
    model: minilm
    task: sst2
    method: lora
    out: runs/sst2-lora
    max_steps: 300
    method_options: {r: 8, alpha: 16}

Every key is a field of the command's config dataclass (`TrainConfig`, `CompareConfig`, `ServeConfig`), typed and
checked from the same field annotations and metadata the command-line options are generated from
(`cli.add_options`); `serve` also takes its `model`, `delta` (NAME: DIR), `host` and `port`. The method's settings
go under `method_options:` (the `TrainConfig` field that `-o KEY=VALUE` fills; `method:` is the method's name), and
`compare`'s per-method ones under `method_options: {lora: {r: 16}}`. Options on the command line override the file
(`-o` settings override the file's one by one); an unknown key is refused with the list of known ones.

Every run folder holds its resolved config (`write_config`: the learning rate, precision and data folder as the run
used them), so `deltatune train --config OUT/config.yaml --out OUT2` trains the same delta again, as torchtune's
recipes are rerun from their saved configs.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import ConfigError
from deltatune.methods.registry import typed_value


def write_config(values: dict[str, Any], path: Path) -> None:
    """`values` as YAML in `path` (replaced atomically: a run killed while saving leaves the old file or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    tmp.replace(path)


def read_config(path: str | Path, config_class: type, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings in the YAML file `path`, each key a field of `config_class` (or a key of `extra`, name -> type),
    each value checked against the field's type and choices. A wrong key, type or choice is a `ConfigError` naming
    the file, the key and what is expected."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (a YAML file of {config_class.__name__} settings)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings (key: value lines), not "
                          f"{type(values).__name__}")
    hints = {**typing.get_type_hints(config_class), **(extra or {})}
    known = [f.name for f in fields(config_class)] + list(extra or {})
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; the known keys are {known}")
    choices = {f.name: f.metadata["choices"] for f in fields(config_class) if "choices" in f.metadata}
    checked = {}
    for key, value in values.items():
        required = any(f.name == key and f.default is MISSING and f.default_factory is MISSING
                       for f in fields(config_class))
        if value is None and required:
            raise ConfigError(f"--config {path}: {key} needs a value")
        checked[key] = _typed(value, hints[key], f"--config {path}: {key}")
        if key in choices and checked[key] is not None and checked[key] not in choices[key]:
            raise ConfigError(f"--config {path}: {key} must be one of {choices[key]}, not {checked[key]!r}")
    return checked


def _typed(value: Any, hint: Any, what: str) -> Any:
    """`typed_value`, also through `dict[str, X]` fields (method options, per-method learning rates)."""
    if hint is Any:
        return value
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{what} must be a mapping (key: value lines), not {value!r:.80}")
        item = typing.get_args(hint)[1]
        return {str(key): _typed(v, item, f"{what}.{key}") for key, v in value.items()}
    return typed_value(value, hint, what)


def config_path(argv: list[str]) -> str | None:
    """The FILE of `--config FILE` (or `--config=FILE`) in a command line, if any."""
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--config="):
            return word.partition("=")[2]
    return None
