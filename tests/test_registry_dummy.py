"""A new method is its own file plus one registry line (methods/registry.py): a dummy method added exactly that way
is picked up by `train`, save/load, a mixed batch, `serve`'s refusal and the peft export's refusal.

The "file" is `Shift` below: a learned vector added to the output of each attention value projection, y = W x + b + s
(a BitFit-like delta on new parameters, Zaken et al. 2021 §2, kept small so the whole method reads in one screen).
Its registry line declares it mixable in a batch but not in a decode batch (so `serve` of a causal LM refuses it
and names the methods that can), with no peft translation (so `export --format peft` refuses it by name)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

import deltatune
from deltatune.core.architectures import DEFAULT_LORA_TARGETS, model_type, resolve_lora_targets, unwrap
from deltatune.core.component import DeltaComponent, TaskState
from deltatune.errors import DeltaError, MergeError, TaskError
from deltatune.methods import registry


# ---- the method's file ----------------------------------------------------------------------------------------
@dataclass
class Shift:
    """Dummy method: a learned shift of each value projection's output."""

    scale: float = field(default=1.0, metadata={"help": "the shift is multiplied by this"})


class OutputShift(DeltaComponent):
    """Per-task vectors `shift` (d_out,) added to one linear layer's output by a forward hook."""

    def __init__(self, layer: nn.Module, state: TaskState):
        super().__init__(state)
        self.shift = nn.ParameterDict()
        self.scale: dict[str, float] = {}
        self.__dict__["hook"] = layer.register_forward_hook(self._add)
        self.width = layer.weight.shape[0]

    @property
    def tasks(self) -> list[str]:
        return list(self.shift.keys())

    def add_task(self, task: str, config: Shift) -> None:
        self.shift[task] = nn.Parameter(torch.zeros(self.width))
        self.scale[task] = config.scale

    def remove_task(self, task: str) -> None:
        del self.shift[task]
        del self.scale[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {"shift": self.shift[task]} if task in self.shift else {}

    def merge(self, task: str) -> None:
        raise MergeError("a shift is not merged in this test")

    def unmerge(self) -> None:
        pass

    def unload(self) -> None:
        self.hook.remove()

    def _add(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:  # a mixed batch: each row gathers its own task's vector
            stack = self.stacked("shift", list(self.shift.values()), lambda: torch.stack(
                [self.shift[t] * self.scale[t] for t in self.tasks] + [torch.zeros(self.width)]))  # (T+1, d_out)
            return output + stack[self.example_rows(output.shape[0], output.device)][:, None, :]
        task = self.active_task
        return output + self.shift[task] * self.scale[task] if task in self.shift else output


def inject(model: nn.Module, config: Shift, task: str, state: TaskState, exclude: list[str]) -> None:
    targets = [t for t in DEFAULT_LORA_TARGETS[model_type(model)] if "value" in t or "v_proj" in t]
    for name in resolve_lora_targets(model, targets, method="shift"):
        layer = unwrap(model.get_submodule(name))
        if getattr(layer, "shift", None) is None:
            layer.shift = OutputShift(layer, state)
        layer.shift.add_task(task, config)


# ---- its registry line ----------------------------------------------------------------------------------------
ENTRY = registry.MethodEntry("shift", Shift, inject, mergeable=False, mixable=True, default_lr=1e-2, peft=None,
                             mixes_in_decode=False)


@pytest.fixture
def shift_registered(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "shift", ENTRY)


def randomised(model, task: str, seed: int):
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def test_train_saves_a_delta_that_loads_onto_a_fresh_base(shift_registered, tiny_model_dir, sentiment_csv, tmp_path):
    from deltatune.training.loop import TrainConfig, train

    summary = train(TrainConfig(model=str(tiny_model_dir), task="csv", method="shift", out=str(tmp_path / "run"),
                                method_options={"scale": 2.0}, max_steps=3, batch_size=8, progress=False,
                                task_options={"path": str(sentiment_csv), "text_columns": ["review"],
                                              "label_column": "sentiment"}))
    assert summary["steps"] == 3
    delta = tmp_path / "run" / "delta"
    trained = deltatune.load_delta(make_model("bert"), delta)
    assert trained.task_info[trained.active_task]["method"] == "shift"
    assert trained.task_info[trained.active_task]["config"] == Shift(scale=2.0)
    shifts = [t for k, t in trained.task_parameters(trained.active_task).items() if k.endswith("shift")]
    assert len(shifts) == 2 and all(t.abs().sum() > 0 for t in shifts)  # both layers' shifts trained (from zeros)

    inputs = make_inputs("bert")
    with torch.no_grad():
        before = trained(**inputs).logits
        again = deltatune.load_delta(make_model("bert"), trained.save_delta(tmp_path / "again"))(**inputs).logits
        trained.use("base")
        plain = trained(**inputs).logits
    assert torch.equal(before, again)
    assert not torch.allclose(before, plain)


def test_a_mixed_batch_runs_each_row_under_its_own_shift(shift_registered):
    model = randomised(deltatune.attach(make_model("bert"), Shift(), task="a"), "a", seed=1)
    randomised(model.add_task(Shift(scale=0.5), task="b"), "b", seed=2)
    model.add_task(deltatune.LoRA(r=2), task="lora")
    inputs = make_inputs("bert", batch=4)
    tasks = ["a", "b", "base", "lora"]
    with torch.no_grad():
        mixed = model(**inputs, tasks=tasks).logits
        for i, task in enumerate(tasks):
            model.use(task)
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0, msg=f"row {i} ({task})")
    assert not torch.allclose(mixed[0], mixed[2])  # the shift changes the row


def test_serve_refuses_it_in_a_decode_batch_by_the_registry(shift_registered, tmp_path):
    from deltatune.serving.config import ServeConfig
    from deltatune.serving.decode_loop import DecodeLoop
    from deltatune.testing import tiny_tokenizer

    path = deltatune.attach(make_model("llama", kind="causal-lm"), Shift(), task="s").save_delta(tmp_path / "s")
    loop = DecodeLoop(deltatune.DeltaModel(make_model("llama", kind="causal-lm")), tiny_tokenizer(),
                      ServeConfig(kind="generation"))
    with pytest.raises(DeltaError) as refused:
        loop._load("s", path)  # before start: this thread owns the model
    message = str(refused.value)
    assert "is a shift delta, whose rows cannot decode in a batch with other tasks" in message
    expected = [name for name, entry in registry.METHODS.items() if entry.mixes_in_decode]
    assert f"serve a delta of one of {expected}" in message and "shift" not in expected
    assert {"lora", "dora", "ia3", "prefix"} <= set(expected) and "top_layers" not in expected
    assert "s" not in loop.model.task_info  # the refused delta was removed again


def test_mixed_generate_refuses_it_by_the_registry(shift_registered):
    model = deltatune.attach(make_model("llama", kind="causal-lm"), Shift(), task="a")
    model.add_task(Shift(), task="b")
    inputs = make_inputs("llama", batch=2)
    with pytest.raises(TaskError, match=r"shift tasks \(\['a', 'b'\]\) cannot share a mixed-task generate") as error:
        model.generate(**inputs, tasks=["a", "b"], max_new_tokens=2)
    assert "'lora'" in str(error.value) and "'shift'" not in str(error.value)


def test_peft_export_refuses_it_by_name(shift_registered, tmp_path):
    from deltatune.formats.peft import export_peft

    delta = deltatune.attach(make_model("bert"), Shift(), task="t").save_delta(tmp_path / "delta")
    with pytest.raises(DeltaError, match=r"shift deltas have no peft equivalent that deltatune exports; \['lora'"):
        export_peft(delta, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_method_that_does_not_mix_is_refused_in_a_mixed_batch_by_the_registry(monkeypatch):
    """No check_mixed of its own: the registry's `mixable=False` alone keeps its rows out of a mixed batch."""
    from dataclasses import replace

    monkeypatch.setitem(registry.METHODS, "shift", replace(ENTRY, mixable=False))
    model = deltatune.attach(make_model("bert"), Shift(), task="a")
    model.add_task(deltatune.LoRA(r=2), task="lora")
    with pytest.raises(TaskError, match=r"shift tasks \(\['a'\]\) cannot share a mixed batch"):
        model(**make_inputs("bert", batch=2), tasks=["a", "lora"])


def test_every_entry_declares_what_its_components_can_do():
    """The mixing flags are declarations: a component that runs its own `generate` without a mixed one (prefix
    tuning's) belongs to a method declaring mixes_in_generate=False, and each flag implies the one before it."""
    for name, entry in registry.METHODS.items():
        config = deltatune.BitFit(add_missing=True) if name == "bitfit" else entry.config()  # Llama has no biases
        model = deltatune.attach(make_model("llama", kind="causal-lm"), config, task="t")
        own_generate = [type(c).__name__ for c in model.components().values()
                        if hasattr(c, "generate") and not hasattr(c, "generate_mixed")]
        assert not (own_generate and entry.mixes_in_generate), (name, own_generate)
        assert entry.mixes_in_decode or not entry.mixes_in_generate, name
        assert entry.mixable or not entry.mixes_in_decode, name
