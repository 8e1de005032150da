"""DeltaModel: one frozen base model carrying any number of per-task deltas.

`attach(model, config, task)` freezes the base and injects a method for one task; `add_delta(path)`
loads another task's delta beside it; `use(task)` switches which one runs; `save_delta(path)` writes
only the active task's parameters (method + head). `merge()` folds a mergeable task into the base
weights (no added latency) and `merge_and_unload()` returns a plain transformers model.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune._version import __version__
from deltatune.core.architectures import (
    HEAD_INPUT_NAMES,
    LENGTH_FIRST_TYPES,
    head_names,
    model_type,
    replace_module,
    wrapped_module,
)
from deltatune.core.component import BASE_TASK, DeltaComponent, TaskState, check_task_name, strip_wrappers
from deltatune.core.heads import TaskHeads
from deltatune.core.quantize import check_trainable, logical_parameters, quantization_info
from deltatune.core.shared_lower import share_lower_blocks
from deltatune.errors import ConfigError, DeltaError, MergeError, TaskError, UnknownTaskError
from deltatune.formats.native import FORMAT, FORMAT_VERSION, shape_fingerprint, weights_fingerprint, write_delta
from deltatune.formats.peft import PEFT_FORMAT, check_peft_fits, read_saved_delta
from deltatune.methods.registry import build_config, method_entry, method_of, methods_that


@dataclass
class ParameterReport:
    """Trainable parameters of one task, split into the method's own and the head's."""

    task: str | None
    method: str | None
    method_parameters: int
    norm_parameters: int  # base-model norms the method also trains (adapters)
    head_parameters: int
    total_parameters: int  # of the base model

    @property
    def trainable(self) -> int:
        return self.method_parameters + self.norm_parameters + self.head_parameters

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total_parameters, 1)

    def __str__(self) -> str:
        rows = [
            ("task", f"{self.task} ({self.method})"),
            ("method parameters", f"{self.method_parameters:,}"),
            ("norm parameters", f"{self.norm_parameters:,}"),
            ("head parameters", f"{self.head_parameters:,}"),
            ("trainable", f"{self.trainable:,}"),
            ("base model", f"{self.total_parameters:,}"),
            ("trainable %", f"{self.percent:.4f}%"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>16}" for k, v in rows)


class _SignedLikeBase:
    """`DeltaModel.forward` as a descriptor: `inspect.signature(delta_model.forward)` lists the wrapped model's
    forward parameters (then `tasks=`, `target_labels=`, `target_sums=`), not `*args, **kwargs`. transformers.Trainer
    keeps only the dataset columns the model's forward names (`Trainer._set_signature_columns_if_needed`), and drops
    `input_ids` and `labels` otherwise. A non-data descriptor: accelerate's or TRL's patched `forward` set on an
    instance still wins."""

    def __init__(self, function: Callable):
        self.function = function
        functools.update_wrapper(self, function)
        self.signed: dict[type, Callable] = {}  # one function per wrapped model class

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        base = instance.__dict__.get("_modules", {}).get("base_model")
        if base is None:
            return types.MethodType(self.function, instance)
        signed = self.signed.get(type(base))
        if signed is None:
            signed = self.signed[type(base)] = self._sign(type(base))
        return types.MethodType(signed, instance)

    def _sign(self, base_class: type) -> Callable:
        own = list(inspect.signature(self.function).parameters.values())  # self, *args, tasks, target_labels, **kw
        ours = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        names = {p.name for p in ours}
        try:
            theirs = list(inspect.signature(base_class.forward).parameters.values())[1:]  # without self
        except (TypeError, ValueError):  # a forward inspect cannot read: keep our own signature
            theirs = []
        named = [p for p in theirs if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        parameters = (own[:1] + [p for p in named if p.kind == p.POSITIONAL_OR_KEYWORD]
                      + [p for p in named if p.kind == p.KEYWORD_ONLY] + ours + own[-1:])
        function = self.function

        def forward(self, *args, **kwargs):
            return function(self, *args, **kwargs)

        functools.update_wrapper(forward, function)
        forward.__signature__ = inspect.Signature(parameters)
        return forward


class DeltaModel(nn.Module):
    """A base model plus per-task deltas. Forwards like the base model with the active task applied."""

    def __init__(self, model: nn.Module, heads: list[str] | str | None = "auto"):
        super().__init__()
        if isinstance(model, DeltaModel):
            raise TypeError("model is already a DeltaModel; call attach()/add_delta() on it directly")
        self.base_model = model
        self.task_state = TaskState()
        self.task_state.batch_dim = 1 if model_type(model) in LENGTH_FIRST_TYPES else 0
        self.head_modules = head_names(model, heads)
        self.task_info: dict[str, dict[str, Any]] = {}
        self.merged_task: str | None = None
        # names, shapes and values as the unquantized checkpoint has them: a delta fits it at any precision
        logical = logical_parameters(model)
        base = {
            name: shape_and_values
            for name, shape_and_values in logical.items()
            if not any(name == h or name.startswith(h + ".") for h in self.head_modules)
        }
        self.base_identity = {
            "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
            or type(model).__name__,
            "model_type": model_type(model),
            "class": type(model).__name__,
            "shape_fingerprint": shape_fingerprint({n: shape for n, (shape, _) in base.items()}),
            "weights_fingerprint": weights_fingerprint({n: values for n, (_, values) in base.items()}),
            "num_parameters": sum(math.prod(shape) for shape, _ in logical.values()),
            "quantization": quantization_info(model),  # None: full precision (Dettmers et al. 2023 for the rest)
        }
        model.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "task_state"}:
                raise
            return getattr(self.base_model, name)  # config, generate, device, ...

    # ---- tasks -------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.task_info)

    @property
    def active_task(self) -> str | None:
        return self.task_state.active

    def components(self) -> dict[str, DeltaComponent]:
        """{module name inside the base model: component} of every injected component."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, DeltaComponent)}

    def _input_components(self) -> list[DeltaComponent]:
        """Components that rewrite the forward kwargs (prompt tuning), found once per model structure:
        walking every module on each forward costs ~0.5 ms (MiniLM), all of a merged model's overhead."""
        if "_input_cache" not in self.__dict__:
            rewriting = [c for c in self.components().values()
                         if type(c).prepare_inputs is not DeltaComponent.prepare_inputs]
            self.__dict__["_input_cache"] = sorted(rewriting, key=lambda c: c.input_order)
        return self.__dict__["_input_cache"]

    def _checking_components(self) -> list[DeltaComponent]:
        """Components with a `check_mixed` of their own (full fine-tuning, top layers), found once per model
        structure: a decode step of a served model checks its tasks each pass (walking every module: ~2% of it)."""
        if "_check_cache" not in self.__dict__:
            self.__dict__["_check_cache"] = [c for c in self.components().values()
                                             if type(c).check_mixed is not DeltaComponent.check_mixed]
        return self.__dict__["_check_cache"]

    def _structure_changed(self) -> None:
        self.__dict__.pop("_input_cache", None)
        self.__dict__.pop("_check_cache", None)

    def add_task(self, config, task: str = "default", label_names: list[str] | None = None) -> DeltaModel:
        """Inject `config`'s method for a new `task` with fresh parameters, and make it active."""
        check_task_name(task)
        if task in self.task_info:
            raise TaskError(f"task {task!r} already exists; use remove_task({task!r}) or another name")
        method = method_of(config)
        check_trainable(self.base_model, method, method_entry(method).updates_base)
        self._structure_changed()
        previous = self.active_task
        self.use(None)  # inject into the plain base: methods that copy base weights (top_layers) copy those
        try:
            method_entry(method).inject(self.base_model, config, task, self.task_state, self.head_modules)
            for name in self.head_modules:
                self._task_heads(name).add_task(task)
        except BaseException:
            self._drop_task_parameters(task)
            self.use(previous)
            raise
        self.task_info[task] = {"method": method, "config": config, "label_names": label_names}
        self.use(task)
        return self

    def _task_heads(self, name: str) -> TaskHeads:
        """The TaskHeads wrapping head module `name` (wrapping it the first time)."""
        return wrapped_module(self.base_model, name, TaskHeads, lambda head: TaskHeads(head, self.task_state))

    def use(self, task: str | None) -> DeltaModel:
        """Make `task` the active one (`None` or "base": the plain base model). Exact: no weights change
        except for full fine-tuning, whose weights are copied in."""
        if task == BASE_TASK:
            task = None
        if task is not None and task not in self.task_info:
            raise UnknownTaskError(f"unknown task {task!r}; tasks loaded: {self.tasks} (or 'base' for none)")
        if self.merged_task is not None and self.merged_task != task:
            self.unmerge()
        self.task_state.active = task
        for component in self.components().values():
            component.on_switch()
        self.base_model.requires_grad_(False)
        if task is not None:
            for tensor in self.trained_parameters(task).values():
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(True)
        return self

    def remove_task(self, task: str) -> None:
        if task not in self.task_info:
            raise UnknownTaskError(f"unknown task {task!r}; tasks loaded: {self.tasks}")
        if self.merged_task == task:
            self.unmerge()
        self._drop_task_parameters(task)
        del self.task_info[task]
        if self.active_task == task:
            self.use(None)

    def _drop_task_parameters(self, task: str) -> None:
        """Remove a task's parameters everywhere, and components left with no task at all."""
        for name, component in sorted(self.components().items(), key=lambda kv: -kv[0].count(".")):
            if task in component.tasks:
                component.remove_task(task)
                component.clear_mixed_cache()
            if not component.tasks:
                self._replace_component(name, component.unload())

    def _replace_component(self, name: str, replacement: nn.Module | None) -> None:
        self._structure_changed()
        replace_module(self.base_model, name, replacement)

    # ---- parameters ---------------------------------------------------------------------------------
    def task_parameters(
        self, task: str | None = None, roles: tuple[str, ...] = ("method", "norm", "head")
    ) -> dict[str, torch.Tensor]:
        """{delta key: tensor} of one task's parameters, for the component roles asked for.

        Keys are the base model's module names (wrappers removed) + the component's parameter name,
        e.g. `bert.encoder.layer.0.attention.self.query.lora_A` or `classifier.weight`."""
        return self._collect(task, lambda component, task: component.task_parameters(task), roles)

    def saved_parameters(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """{delta key: tensor} as `save_delta` writes them: `task_parameters`, in the form that applies to the
        unmodified base where a method trains another (PiSSA: `DeltaComponent.saved_parameters`)."""
        return self._collect(task, lambda component, task: component.saved_parameters(task))

    def _collect(self, task: str | None, get, roles: tuple[str, ...] | None = ("method", "norm", "head")) -> dict:
        """{key: tensor} of `get(component, task)` over the task's components (of `roles`; None: all)."""
        task = task or self.active_task
        if task not in self.task_info:
            raise UnknownTaskError(f"unknown task {task!r}; tasks loaded: {self.tasks}")
        found: dict[str, torch.Tensor] = {}
        for name, component in self.components().items():
            if task not in component.tasks or (roles is not None and component.role not in roles):
                continue
            prefix = "" if component.root_level else strip_wrappers(name) + "."
            for local, tensor in get(component, task).items():
                found[prefix + local] = tensor
        return found

    def trained_parameters(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """{key: parameter} the optimizer updates for one task: `task_parameters`, except where a method
        trains through a reparameterization and saves only its output (prefix tuning's MLP)."""
        return self._collect(task, lambda component, task: component.trained_parameters(task), roles=None)

    def head_keys(self, task: str | None = None) -> list[str]:
        return list(self.task_parameters(task, roles=("head",)))

    def trainable_parameters(self) -> int:
        """Number of parameters that receive gradients now."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def report(self, task: str | None = None, print_table: bool = True) -> ParameterReport:
        task = task or self.active_task

        def count(role: str) -> int:
            return sum(t.numel() for t in self.task_parameters(task, roles=(role,)).values()) if task else 0

        report = ParameterReport(
            task=task,
            method=self.task_info[task]["method"] if task else None,
            method_parameters=count("method"),
            norm_parameters=count("norm"),
            head_parameters=count("head"),
            total_parameters=self.base_identity["num_parameters"],
        )
        if print_table:
            print(report)
        return report

    # ---- merging ------------------------------------------------------------------------------------
    def merge(self) -> DeltaModel:
        """Fold the active task into the base weights: W <- W + (alpha/r) B A (LoRA), b <- b + Δb (BitFit)."""
        task = self.active_task
        if task is None:
            raise MergeError("no active task to merge; call use(task) first")
        method = self.task_info[task]["method"]
        if not method_entry(method).mergeable:
            raise MergeError(
                f"task {task!r} uses {method}, which cannot be merged into the base weights "
                f"(it adds computation that is not a weight change); use it unmerged"
            )
        if self.merged_task == task:
            return self
        self.unmerge()
        for component in self.components().values():
            if task in component.tasks:
                component.merge(task)
        self.merged_task = task
        return self

    def unmerge(self) -> DeltaModel:
        for component in self.components().values():
            component.unmerge()
        self.merged_task = None
        return self

    def merge_and_unload(self) -> nn.Module:
        """Merge the active task and return the plain base model with it baked in (no deltatune modules
        remain). This DeltaModel must not be used afterwards."""
        self.merge()
        for name, component in sorted(self.components().items(), key=lambda kv: -kv[0].count(".")):
            self._replace_component(name, component.unload())
        model = self.base_model
        model.requires_grad_(True)
        self.task_info.clear()
        self.task_state.active = None
        return model

    # ---- disk ---------------------------------------------------------------------------------------
    def save_delta(self, path: str | Path, task: str | None = None) -> Path:
        """Write the task's delta (default: the active task) to folder `path`, atomically."""
        return write_delta(path, *self.described_delta(task))

    def described_delta(self, task: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, delta.json) of the task's delta (default: the active task), as `save_delta` writes them."""
        task = task or self.active_task
        if task is None:
            raise TaskError(f"no active task to save; tasks loaded: {self.tasks}")
        info = self.task_info[task]
        tensors = self.saved_parameters(task)
        config = info["config"]
        if hasattr(config, "saved_config"):  # trained in one form, saved in the one the plain base takes (PiSSA)
            config = config.saved_config()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "deltatune_version": __version__,
            "task": task,
            "method": info["method"],
            "config": asdict(config),
            "label_names": info["label_names"],
            "head_keys": self.head_keys(task),
            "num_parameters": sum(t.numel() for t in tensors.values()),
            "base": self.base_identity,
        }
        if info.get("prompt_format"):  # generation from the user's files: how prompts are built
            meta["prompt_format"] = info["prompt_format"]
        layouts = {strip_wrappers(name): layout for name, component in self.components().items()
                   if task in component.tasks and (layout := component.saved_layout()) is not None}
        if layouts:  # which output rows of fused layers the delta's tensors adapt (what peft export needs)
            meta["output_rows"] = layouts
        return tensors, meta

    def add_delta(self, path: str | Path, task: str | None = None, trust_pickle: bool = False) -> str:
        """Load a saved delta as a new task (its saved name unless `task` is given). Returns the name.

        Anything wrong with the files (corrupt, malformed, made for another model) is a `DeltaError`;
        a bad or taken `task` name given here is a `TaskError`. On any error the model is left exactly
        as it was. `trust_pickle`: see `read_delta`."""
        tensors, meta = read_saved_delta(path, trust_pickle=trust_pickle, model=self.base_model)
        return self._add_described(tensors, meta, path, task)

    def combine(self, tasks: list[str], task: str = "combined", **settings) -> DeltaModel:
        """Combine loaded LoRA tasks into a new task `task` and make it active: `settings` are those of
        `deltatune.formats.combine.CombineConfig` (how="linear"|"svd"|"ties"|"dare", weights, rank, density, seed,
        head: the task whose head it carries, default the first). The same result as saving the tasks and
        running `deltatune combine` on the folders, then loading that."""
        from deltatune.formats.combine import CombineConfig, Source, combine

        for name in tasks:
            if name not in self.task_info:
                raise UnknownTaskError(f"unknown task {name!r}; tasks loaded: {self.tasks}")
        sources = [Source(name, *self.described_delta(name), f"task {name!r}") for name in tasks]
        tensors, meta = combine(sources, CombineConfig(**settings))
        self._add_described(tensors, meta, f"combine({tasks})", task)
        return self

    def _add_described(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path,
                       task: str | None) -> str:
        self.check_base(meta, path)
        if task is None:
            try:
                task = check_task_name(meta["task"])
            except TaskError as error:
                raise DeltaError(f"{path}: delta.json: {error}; pass another name to load it under") from None
        check_task_name(task)
        if task in self.task_info:
            raise TaskError(f"task {task!r} already exists; use remove_task({task!r}) or another name")
        try:
            config = build_config(meta["method"], meta["config"], source=f"{path}: delta.json")
        except ConfigError as error:
            raise DeltaError(str(error)) from None
        previous, merged = self.active_task, self.merged_task
        try:
            self.add_task(config, task, label_names=meta["label_names"])
            self._fill_task(task, tensors, meta, path)
            if isinstance(meta.get("prompt_format"), dict):
                self.task_info[task]["prompt_format"] = meta["prompt_format"]
        except BaseException as error:
            if task in self.task_info:
                self.remove_task(task)
            self.use(previous)
            if merged is not None:
                self.merge()  # use() unmerged it to switch to the new task
            unfit = isinstance(error, TypeError | ValueError | RuntimeError | re.error)  # unknown targets, bad regex...
            if unfit and not isinstance(error, DeltaError):
                raise DeltaError(f"{path} does not fit this model: {error}") from error
            raise
        return task

    def check_base(self, meta: dict[str, Any], path: str | Path) -> None:
        """Refuse a delta made for another base model (different parameter names/shapes)."""
        if meta.get("format") == PEFT_FORMAT:  # a Hugging Face peft adapter: it describes no base model
            return check_peft_fits(self, meta, path)
        base = meta.get("base")
        if not isinstance(base, dict):
            raise DeltaError(f"{path}: delta.json has no 'base' model description")
        if base.get("shape_fingerprint") != self.base_identity["shape_fingerprint"]:
            raise DeltaError(
                f"{path} was made for base model {base.get('name_or_path')!r} "
                f"(type {base.get('model_type')}, {base.get('class')}, {base.get('num_parameters'):,} parameters), "
                f"but this model is {self.base_identity['name_or_path']!r} "
                f"(type {self.base_identity['model_type']}, {self.base_identity['class']}, "
                f"{self.base_identity['num_parameters']:,} parameters); load it onto the model it was made for"
                if isinstance(base.get("num_parameters"), int)
                else f"{path} was made for another base model ({base.get('name_or_path')!r})"
            )
        trained_on, here = base.get("quantization"), self.base_identity["quantization"]
        if trained_on != here:
            warnings.warn(
                f"{path} was trained on {_precision(trained_on)} base and is loaded onto {_precision(here)} base "
                f"of the same model: it runs as it is, but its outputs differ by the quantization error of the base",
                stacklevel=3)
        mine = self.base_identity["weights_fingerprint"]
        theirs = base.get("weights_fingerprint")
        if mine and theirs and mine != theirs:
            warnings.warn(
                f"{path} was made for {base.get('name_or_path')!r}, a model with the same architecture but "
                f"different weights than {self.base_identity['name_or_path']!r}; results may differ",
                stacklevel=3,
            )

    def _fill_task(self, task: str, tensors: dict[str, torch.Tensor], meta: dict, path) -> None:
        own_head = self.task_parameters(task, roles=("head",))
        if meta.get("format") == PEFT_FORMAT:  # without modules_to_save, peft runs the model's own head
            tensors = {**own_head, **tensors}
        for name in self.head_modules:  # a pooler the delta did not train (saved before it was a head, or by
            if name.rsplit(".", 1)[-1] in HEAD_INPUT_NAMES:  # peft): it ran with the model's own, as it was trained
                keys = [key for key in own_head if key.startswith(name + ".")]
                if not any(key in tensors for key in keys):
                    tensors = {**{key: own_head[key] for key in keys}, **tensors}
        head_keys = set(meta["head_keys"])
        current = {key: tensor.shape for key, tensor in own_head.items()}
        strange = sorted(head_keys - (set(current) & set(tensors)))
        if strange:
            raise DeltaError(f"{path}: head_keys {strange[:3]} are not head parameters of both the file and this model")
        resized = {key: tensors[key].shape for key in head_keys if tensors[key].shape != current[key]}
        for layer in {key.rpartition(".")[0] for key in resized}:
            # another number of labels: all of the output layer's parameters get one new dim 0, nothing else
            own = [key for key in current if key.rpartition(".")[0] == layer]
            if not (
                all(key in resized and len(resized[key]) == len(current[key]) >= 1 for key in own)
                and len({resized[key][0] for key in own}) == 1
                and all(resized[key][0] >= 1 and resized[key][1:] == current[key][1:] for key in own)
            ):
                saved = {key: tuple(tensors[key].shape) for key in own if key in tensors}
                raise DeltaError(f"{path}: head layer {layer} is saved with shapes {saved}, which are not this "
                                 f"model's {({key: tuple(current[key]) for key in own})} with another number of labels")
        for name in self.head_modules:  # a head saved with another number of labels
            shapes = {k[len(name) + 1 :]: tensors[k].shape for k in head_keys if k.startswith(name + ".")}
            self._task_heads(name).resize(task, shapes)
        expected = self.task_parameters(task)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise DeltaError(
                f"{path} does not fit this model: missing {len(missing)} key(s) {missing[:3]}, "
                f"unexpected {len(unexpected)} key(s) {unexpected[:3]}"
            )
        converted = {}
        for key, target in expected.items():
            source = tensors[key]
            if source.shape != target.shape:
                raise DeltaError(f"{path}: {key} has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
            if not source.is_floating_point():
                raise DeltaError(f"{path}: {key} has dtype {source.dtype}, expected floating point")
            converted[key] = source.to(target.dtype)  # checked after the cast: 1e300 in float64 is Inf in float32
            if not torch.isfinite(converted[key]).all():
                raise DeltaError(f"{path}: {key} contains NaN or Inf values (in {target.dtype})")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(converted[key])
        for component in self.components().values():
            if task in component.tasks:
                component.on_load(task)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model runs as the plain base (no task's delta); the active task after it.
        The name peft's `PeftModel.disable_adapter()` has, which TRL calls for the reference model of DPO."""
        previous = self.active_task
        self.use(None)
        try:
            yield
        finally:
            self.use(previous)

    # ---- forward ------------------------------------------------------------------------------------
    @_SignedLikeBase
    def forward(self, *args, tasks: list[str | None] | None = None, target_labels: torch.Tensor | None = None,
                target_sums: bool = False, **kwargs):
        """The base model's forward with the active task's delta. With `tasks=` (one task name per example;
        "base" or None: no delta) a mixed-task batch: each example runs with its own task's delta in one
        pass, with the results of running it alone after `use(task)`. Full fine-tuning tasks cannot be
        mixed; a merged task is unmerged first (as `use` does); heads with different numbers of labels
        give logits padded with -inf (see `TaskHeads`).

        With `target_labels=` (a causal LM's token labels, -100 where no loss is) it returns the mean
        next-token loss instead of the outputs, running the LM head on the target positions only
        (`deltatune.core.lm_loss`): equal to the loss from the full logits, with a fraction of the work. With
        `target_sums=True` as well: ((B,) each row's summed target log-probability, (B,) its target count), what
        preference tuning compares (`lm_loss.target_log_probs`)."""
        target_loss = "sums" if target_sums and target_labels is not None else target_labels is not None
        if target_labels is not None:
            kwargs["labels"] = target_labels  # prompt tuning extends them over its virtual tokens
        if tasks is not None:
            return self._forward_mixed(self._example_tasks(tasks, args, kwargs), args, kwargs, target_loss)
        for component in self._input_components():
            kwargs = component.prepare_inputs(kwargs)
        return self._run_base(args, kwargs, target_loss)

    def _run_base(self, args, kwargs, target_loss: bool | str):
        if target_loss:
            from deltatune.core.lm_loss import target_log_probs, target_only_loss

            labels = kwargs.pop("labels")
            if target_loss == "sums":
                return target_log_probs(self.base_model, kwargs, labels)
            return target_only_loss(self.base_model, kwargs, labels)
        return self.base_model(*args, **kwargs)

    @contextmanager
    def _rows_routed(self, per_example: list[str | None]):
        """For one mixed call: check the tasks can share it, unmerge a merged task unless it is the only one,
        and route the rows — one task for all takes its own single-task path (the fastest), several set
        `per_example`, read by every component's mixed path. Yields the distinct tasks; restored after."""
        distinct = set(per_example)
        for component in self._checking_components():
            component.check_mixed(distinct)
        if len(distinct) > 1:
            self._refuse_unmixable(distinct, "mixable", "share a mixed batch", "run them alone with use(task)")
        if self.merged_task is not None and distinct != {self.merged_task}:
            self.unmerge()
        state, active = self.task_state, self.task_state.active
        try:
            if len(distinct) == 1:
                state.active = per_example[0]
            else:
                state.per_example = per_example
            yield distinct
        finally:
            state.per_example = None
            state.active = active

    def _forward_mixed(self, per_example: list[str | None], args, kwargs, target_loss: bool | str = False):
        with self._rows_routed(per_example) as distinct:
            for component in self._input_components():
                kwargs = component.prepare_inputs(kwargs)
            if len(distinct) == 1:
                return self._run_base(args, kwargs, target_loss)
            with share_lower_blocks(self, per_example, kwargs):  # one input for several tasks: lower blocks once
                return self._run_base(args, kwargs, target_loss)

    def _example_tasks(self, tasks, args, kwargs) -> list[str | None]:
        """`tasks=` checked against the loaded tasks and the batch size; "base" becomes None."""
        if isinstance(tasks, str) or not all(t is None or isinstance(t, str) for t in tasks):
            raise TaskError(f"tasks= takes a list with one task name per example, not {tasks!r:.80}; "
                            f"for one task for the whole batch, call use(task)")
        names = list(tasks)
        unknown = sorted({t for t in names if t not in self.task_info and t not in (BASE_TASK, None)})
        if unknown:
            raise UnknownTaskError(f"unknown task(s) {unknown} in tasks=; tasks loaded: {self.tasks} (or 'base' for "
                                   f"none)")
        batched = [kwargs.get(k) for k in ("input_ids", "inputs_embeds", "attention_mask")] + list(args[:1])
        first = next((t for t in batched if isinstance(t, torch.Tensor)), None)
        if first is not None and first.shape[0] != len(names):
            raise TaskError(f"tasks= names {len(names)} task(s) for a batch of {first.shape[0]} examples")
        return [None if t == BASE_TASK else t for t in names]

    def generate(self, *args, tasks: list[str | None] | None = None, **kwargs):
        """The base model's `generate` under the active task. A component that rewrites the input sequence
        (prompt tuning: the prompt is not made of token ids) runs the generation itself.

        With `tasks=` (one task name per row, "base"/None: no delta; left-padded `input_ids` and their
        `attention_mask`) each row decodes under its own task's delta in one batched generation, prefill
        and every cached decoding step: the tokens of generating each row alone after `use(task)`."""
        if tasks is not None:
            return self._generate_mixed(self._example_tasks(tasks, args, kwargs), args, kwargs)
        for component in self.components().values():
            if component.active_task in component.tasks and hasattr(component, "generate"):
                return component.generate(self.base_model, *args, **kwargs)
        return self.base_model.generate(*args, **kwargs)

    def _refuse_unmixable(self, tasks: set[str | None], can: str, what: str, instead: str) -> None:
        """A TaskError naming the tasks whose method's registry entry says it cannot (`can`, a MethodEntry flag)."""
        by_method: dict[str, list[str]] = {}
        for task in sorted(t for t in tasks if t in self.task_info):
            by_method.setdefault(self.task_info[task]["method"], []).append(task)
        for method, names in by_method.items():
            if not getattr(method_entry(method), can):
                raise TaskError(f"{method} tasks ({names}) cannot {what}; {instead} (the methods that can: "
                                f"{methods_that(can)})")

    def _generate_mixed(self, per_example: list[str | None], args, kwargs):
        components = self.components().values()
        with self._rows_routed(per_example) as distinct:  # per_example is read at the prefill and each step
            if len(distinct) == 1:
                return self.generate(*args, **kwargs)
            self._refuse_unmixable(distinct, "mixes_in_generate", "share a mixed-task generate yet",
                                   "generate their rows with use(task) + generate")
            for component in components:
                if hasattr(component, "generate_mixed") and distinct & set(component.tasks):
                    return component.generate_mixed(self.base_model, *args, **kwargs)
            return self.base_model.generate(*args, **kwargs)


def attach(
    model: nn.Module,
    config,
    task: str = "default",
    heads: list[str] | str | None = "auto",
    label_names: list[str] | None = None,
) -> DeltaModel:
    """Freeze `model`, inject `config`'s method for `task`, mark it (and the task head) trainable.

    `heads="auto"` trains the standard classification heads (`classifier`, `score`, ...); pass module
    names to choose others, or None for no head. Calling it on a DeltaModel adds another task."""
    delta_model = model if isinstance(model, DeltaModel) else DeltaModel(model, heads=heads)
    if label_names is None:
        label_names = _label_names(delta_model.base_model)
    return delta_model.add_task(config, task, label_names=label_names)


def load_delta(model: nn.Module, path: str | Path, task: str | None = None, trust_pickle: bool = False) -> DeltaModel:
    """Load the delta at `path` onto `model` (a plain model or a DeltaModel) and make it active.
    Errors: see `DeltaModel.add_delta`."""
    delta_model = model if isinstance(model, DeltaModel) else DeltaModel(model)
    delta_model.add_delta(path, task=task, trust_pickle=trust_pickle)
    return delta_model


def _precision(quantization: dict[str, Any] | None) -> str:
    """"a full-precision", "an int8-quantized" (int8, int4, nf4: each read with a vowel first)."""
    return "a full-precision" if not isinstance(quantization, dict) else f"an {quantization.get('scheme')}-quantized"


def _label_names(model: nn.Module) -> list[str] | None:
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names
