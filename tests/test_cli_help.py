"""The command line's help: every option explained, the lists of models, tasks and methods generated from the
registries (models.SHORTCUTS, tasks.catalog, methods/registry.py), so that a new entry shows up in --help."""

from __future__ import annotations

import argparse

import pytest

from deltatune.cli import build_parser
from deltatune.methods.registry import METHODS
from deltatune.models import SHORTCUTS
from deltatune.tasks.catalog import TASK_NAMES


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def option(command: str, flag: str) -> argparse.Action:
    return next(a for a in commands()[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_and_argument_has_help(command):
    missing = [a.option_strings or a.dest for a in commands()[command]._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"deltatune {command}: no help for {missing}"


@pytest.mark.parametrize("command", [c for c in sorted(commands()) if c != "params"])
def test_model_help_names_every_shortcut(command):
    actions = [a for a in commands()[command]._actions if "--model" in a.option_strings]
    for action in actions:
        assert all(shortcut in action.help for shortcut in SHORTCUTS), (command, action.help)


def test_task_and_method_lists_are_the_registries():
    task_help = option("train", "--task").help
    assert all(name in task_help for name in TASK_NAMES), task_help
    assert option("train", "--method").choices == list(METHODS)
    methods_help = option("compare", "--methods").help
    assert all(name in methods_help for name in METHODS), methods_help
    assert all(name in option("sweep", "--method").help for name in METHODS)


@pytest.mark.parametrize("command", ["generate", "eval", "predict", "prompt"])
def test_quantize_help_of_inference_commands_speaks_of_running_not_training(command):
    text = option(command, "--quantize").help
    assert "train" not in text and "int8" in option(command, "--quantize").choices


def test_unknown_method_is_named_as_the_method_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "m", "--task", "sst2", "--method", "nosuch", "--out", "o"])
    error = capsys.readouterr().err
    assert "--method" in error and "'nosuch'" in error and "-o:" not in error
    assert all(name in error for name in METHODS)
