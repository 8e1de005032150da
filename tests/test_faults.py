"""Nothing lost, nothing unsafe: corrupt and hostile delta files, saves killed at every step, training
killed and resumed, numerical faults.

- Loading: hypothesis feeds `add_delta` damaged files (bytes, tensors, delta.json). Each one either
  loads completely or raises a `DeltaError` naming the folder, and then the model (state_dict, module
  tree, tasks, active/merged task, trainable flags) is exactly as before.
- Saving: every step of `atomic_folder` is made to fail (an exception) or to kill the process (a forked
  child that `os._exit`s there), and a child saving in a loop is SIGKILLed at random times: the folder
  always holds the old or the new complete delta, and leftovers are cleaned up by the next save.
- Training: `python -m deltatune.cli train` SIGKILLed and resumed ends with the delta of an uninterrupted
  run, bit for bit; SIGTERM saves a checkpoint and exits non-zero with a message.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune
import deltatune.formats.native as io
import deltatune.training.loop as train_module
from deltatune.cli import main as cli_main
from deltatune.core.component import TASK_NAME
from deltatune.errors import DeltaError, TrainingError
from deltatune.formats.native import FORMAT, META_FILE, WEIGHTS_FILE, read_delta, write_delta
from deltatune.testing import tiny_tokenizer
from deltatune.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
HEAD_KEYS = {"classifier.weight", "classifier.bias"}  # the tiny BERT's head
# examples per fuzz test from the hypothesis profile (tests/conftest.py): 150 by default, 1,000 under
# HYPOTHESIS_PROFILE=thorough (3,000 damaged deltas over the three tests below)
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_own_signal_handlers():
    """Run on one torch thread, here and in child processes (OMP_NUM_THREADS=1): the same arithmetic
    everywhere, and tiny models run several times faster on one thread of a busy machine. Afterwards put
    back the thread count and pytest's SIGINT/SIGTERM handlers (train() leaves its own when it raises)."""
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


# ---- loading damaged files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_deltas(tmp_path_factory) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Two well-formed deltas for the tiny BERT (non-zero values, 2 labels): {method: (tensors, meta)}."""
    folder = tmp_path_factory.mktemp("good")
    deltas = {}
    for method, config in {"lora": deltatune.LoRA(r=2), "bitfit": deltatune.BitFit()}.items():
        model = deltatune.attach(make_model("bert"), config, task="sentiment", label_names=["neg", "pos"])
        with torch.no_grad():
            for tensor in model.task_parameters().values():
                tensor.normal_()
        model.save_delta(folder / method)
        deltas[method] = read_delta(folder / method)
    return deltas


@pytest.fixture(scope="module")
def targets() -> dict[str, deltatune.DeltaModel]:
    """Models the damaged deltas are loaded onto: a bare one, one with a task, one with a merged task."""
    bare = deltatune.DeltaModel(make_model("bert"))
    with_task = deltatune.attach(make_model("bert"), deltatune.LoRA(r=4), task="existing")
    merged = deltatune.attach(make_model("bert"), deltatune.LoRA(r=4), task="existing")
    with torch.no_grad():
        for tensor in merged.task_parameters().values():
            tensor.normal_()
    merged.merge()
    return {"bare": bare, "with_task": with_task, "merged": merged}


def snapshot(model: deltatune.DeltaModel) -> dict:
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "tasks": list(model.tasks),
        "active": (model.active_task, model.merged_task),
        "trainable": [(name, p.requires_grad) for name, p in model.named_parameters()],
    }


def assert_unchanged(model: deltatune.DeltaModel, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert (after["tasks"], after["active"], after["trainable"]) == (
        before["tasks"], before["active"], before["trainable"])
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def load_and_check(model: deltatune.DeltaModel, folder: Path, must_fail: bool, tensors=None) -> str:
    """Load `folder`: a DeltaError leaves the model unchanged; a success holds exactly the file's values
    (then the task is removed again, which must also restore the model). Returns what happened."""
    before = snapshot(model)
    try:
        task = model.add_delta(folder)
    except DeltaError as error:
        assert str(folder) in str(error), f"the message does not name the delta: {error}"
        assert_unchanged(model, before)
        return "refused"
    try:
        assert not must_fail, "a damaged delta loaded"
        loaded = model.task_parameters(task)
        assert loaded.keys() == tensors.keys()
        for key, value in loaded.items():
            assert torch.equal(value.detach(), tensors[key].to(value.dtype)), key
            assert torch.isfinite(value).all(), key
    finally:  # also after a failed check, so that the next example starts from the same model
        model.remove_task(task)
        model.use(before["active"][0])
        if before["active"][1]:
            model.merge()
    assert_unchanged(model, before)
    return "loaded"


def write_folder(folder: Path, tensors: dict | None, meta: dict | None, weights: bytes | None = None,
                 meta_bytes: bytes | None = None) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if weights is not None:
        (folder / WEIGHTS_FILE).write_bytes(weights)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_FILE)
    (folder / META_FILE).write_bytes(meta_bytes if meta_bytes is not None else json.dumps(meta).encode())
    return folder


# integers stay small or absurd: a hostile r=10**7 would make LoRA allocate gigabytes before the shape
# check refuses it (see the note in docs/errors.md)
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-1000, 1000) | st.sampled_from([2**62, 2**70, -(2**63)])
                | st.floats(allow_nan=False) | st.text(max_size=8))
NOT_OBJECTS = JSON_SCALARS | st.lists(JSON_SCALARS, max_size=3)
JSON_VALUES = NOT_OBJECTS | st.dictionaries(st.text(max_size=5), NOT_OBJECTS, max_size=3)
HOSTILE_NAMES = st.sampled_from(
    ["", ".", "..", "../x", "../../etc/passwd", "a/b", "a\\b", "/abs", "base", "x" * 65, "-dash", "a b", "a\x00b",
     "clear", "keys", "tâche", "C:\\x"]
) | st.text(min_size=1, max_size=12).filter(lambda name: not TASK_NAME.match(name))


@st.composite
def damaged_meta(draw, meta: dict, method: str) -> tuple[str, dict | bytes, bool]:
    """(what was done, delta.json content, whether it must be refused)."""
    meta = json.loads(json.dumps(meta))
    kind = draw(st.sampled_from(
        ["drop field", "retype field", "hostile task", "config value", "config extra", "config not a dict",
         "other method", "other base", "label_names", "head_keys", "not json", "deep json", "not an object"]))
    if kind == "drop field":
        field = draw(st.sampled_from(sorted(meta)))
        del meta[field]
        return f"{kind} {field}", meta, field in io.META_FIELDS or field == "format"
    if kind == "retype field":
        field = draw(st.sampled_from(sorted(meta)))
        meta[field] = draw(JSON_VALUES)
        return f"{kind} {field}", meta, False
    if kind == "hostile task":
        meta["task"] = draw(HOSTILE_NAMES)
        return kind, meta, True
    if kind == "config value":
        field = draw(st.sampled_from(sorted(meta["config"]) or ["r"]))
        meta["config"][field] = draw(st.sampled_from(["8", 2.5, -1, 0, None, [2], True, {"r": 2}, "query"])
                                     | JSON_VALUES)
        return f"{kind} {field}", meta, False
    if kind == "config extra":
        meta["config"][draw(st.sampled_from(["rank", "bias", "__class__", "method"]))] = 1
        return kind, meta, True
    if kind == "config not a dict":
        meta["config"] = draw(NOT_OBJECTS)
        return kind, meta, True
    if kind == "other method":
        other = "bitfit" if method == "lora" else "lora"
        meta["method"] = draw(st.sampled_from([other, "LoRA", "", "../lora", "pickle"]))
        return kind, meta, True
    if kind == "other base":
        meta["base"] = draw(st.sampled_from([{}, {"shape_fingerprint": "0" * 16}, {"num_parameters": "many"}])
                            | NOT_OBJECTS)
        return kind, meta, True
    if kind == "label_names":
        meta["label_names"] = draw(JSON_VALUES)
        valid = meta["label_names"] is None or (
            isinstance(meta["label_names"], list) and all(isinstance(name, str) for name in meta["label_names"]))
        return kind, meta, not valid
    if kind == "head_keys":
        meta["head_keys"] = draw(st.sampled_from([["../classifier.weight"], ["classifier.nope"], 5, "classifier",
                                                  ["bert.embeddings.word_embeddings.weight"]]) | JSON_VALUES)
        keys = meta["head_keys"]
        valid = isinstance(keys, list) and all(isinstance(key, str) for key in keys) and set(keys) <= HEAD_KEYS
        return kind, meta, not valid
    if kind == "not json":
        broken = st.sampled_from([b"", b"{", b"{'format': 1}", b"\xff\xfe{}", b"NaN"]) | st.binary(max_size=20)
        return kind, draw(broken), True
    if kind == "deep json":
        return kind, b"[" * 100_000 + b"]" * 100_000, True
    return kind, json.dumps(draw(NOT_OBJECTS)).encode(), True


@PROPERTY
@given(data=st.data())
def test_damaged_delta_json_is_refused_cleanly(good_deltas, targets, tmp_path, data):
    method = data.draw(st.sampled_from(sorted(good_deltas)), label="method")
    target = data.draw(st.sampled_from(sorted(targets)), label="model")
    tensors, meta = good_deltas[method]
    kind, damaged, must_fail = data.draw(damaged_meta(meta, method), label="damage")
    raw = damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode()
    folder = write_folder(tmp_path / "delta", tensors, None, meta_bytes=raw)
    event(f"{kind}: {load_and_check(targets[target], folder, must_fail, tensors)}")


@st.composite
def damaged_tensors(draw, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], bool]:
    tensors = dict(tensors)
    key = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["dtype", "float dtype", "shape", "nan", "huge float64", "drop key", "extra key",
                                 "rename key", "values"]))
    value = tensors[key]
    if kind == "dtype":
        tensors[key] = value.to(draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])))
    elif kind == "float dtype":  # another float type holding the same values: loads, cast back
        tensors[key] = value.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64])))
    elif kind == "shape":
        shape = draw(st.sampled_from(["flat", "extra dim", "fewer rows", "more rows", "scalar", "empty"]))
        tensors[key] = {
            "flat": value.reshape(-1), "extra dim": value.unsqueeze(0), "fewer rows": value[:-1],
            "more rows": torch.cat([value, value[:1]]), "scalar": value.reshape(-1)[0].clone(), "empty": value[:0],
        }[shape]
        kind = f"shape {shape}" if tensors[key].shape != value.shape else "values"  # flat 1-D: unchanged
    elif kind == "nan":
        bad = value.clone()
        bad.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = bad
    elif kind == "huge float64":  # finite in the file, Inf once cast to the model's float32
        tensors[key] = value.double() * 1e300
    elif kind == "drop key":
        del tensors[key]
    elif kind == "extra key":
        tensors[draw(st.sampled_from(["extra", "classifier.extra", "../x", key + ".copy"]))] = value.clone()
    elif kind == "rename key":
        tensors[draw(st.sampled_from(["../" + key, key.upper(), key + "_", "/" + key]))] = tensors.pop(key)
    else:  # other finite values: a different but valid delta
        tensors[key] = torch.randn_like(value)
    # one tensor with another shape is refused even in the head: weight and bias must change together
    return kind, tensors, kind not in {"float dtype", "values"}


@PROPERTY
@given(data=st.data())
def test_damaged_tensors_are_refused_cleanly(good_deltas, targets, tmp_path, data):
    method = data.draw(st.sampled_from(sorted(good_deltas)), label="method")
    target = data.draw(st.sampled_from(sorted(targets)), label="model")
    tensors, meta = good_deltas[method]
    kind, damaged, must_fail = data.draw(damaged_tensors(tensors), label="damage")
    folder = write_folder(tmp_path / "delta", damaged, meta)
    event(f"{kind}: {load_and_check(targets[target], folder, must_fail, damaged)}")


@st.composite
def damaged_bytes(draw, data: bytes) -> tuple[str, bytes, bool]:
    header_length = struct.unpack("<Q", data[:8])[0]
    kind = draw(st.sampled_from(["truncate", "header length", "flip in header", "flip anywhere", "garbage"]))
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))], True
    if kind == "header length":
        wrong = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != header_length))
        return kind, struct.pack("<Q", wrong) + data[8:], True
    if kind == "garbage":
        return kind, draw(st.binary(max_size=64)), True
    start = 8 if kind == "flip in header" else 0
    end = 8 + header_length if kind == "flip in header" else len(data)
    position = draw(st.integers(start, end - 1))
    flipped = bytes([data[position] ^ draw(st.integers(1, 255))])
    return kind, data[:position] + flipped + data[position + 1 :], False


@PROPERTY
@given(data=st.data())
def test_damaged_safetensors_bytes_are_refused_cleanly(good_deltas, targets, tmp_path, data):
    method = data.draw(st.sampled_from(sorted(good_deltas)), label="method")
    target = data.draw(st.sampled_from(sorted(targets)), label="model")
    tensors, meta = good_deltas[method]
    original = write_folder(tmp_path / "original", tensors, meta)
    kind, weights, must_fail = data.draw(damaged_bytes((original / WEIGHTS_FILE).read_bytes()), label="damage")
    folder = write_folder(tmp_path / "delta", None, meta, weights=weights)
    if not must_fail:  # a flipped byte may still be a valid file, with other values
        try:
            tensors = load_file(folder / WEIGHTS_FILE)
        except Exception:  # not a valid file: add_delta must refuse it
            pass
    event(f"{kind}: {load_and_check(targets[target], folder, must_fail, tensors)}")


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("target", ["bare", "with_task", "merged"])
def test_a_tensor_of_the_same_size_but_another_shape_is_refused(good_deltas, targets, tmp_path, method, target):
    """Pinned, not left to the fuzzer's draws: each tensor reshaped to another shape with the same number of
    elements (same bytes in the file: a LoRA A of (r, d) stored as (d, r), a bias as a column)."""
    tensors, meta = good_deltas[method]
    for key, value in tensors.items():
        square = value.ndim == 2 and value.shape[0] == value.shape[1]  # BERT's pooler: a column instead
        other = value.reshape(value.shape[::-1]) if value.ndim == 2 and not square else value.reshape(-1, 1)
        assert other.shape != value.shape and other.numel() == value.numel()
        folder = write_folder(tmp_path / "delta", {**tensors, key: other}, meta)
        assert load_and_check(targets[target], folder, True, None) == "refused", key


def test_a_delta_for_another_head_size_still_loads(tmp_path):
    """The shape rules above refuse one head tensor resized alone, not a real 3-label delta."""
    three_labels = make_model("bert")
    three_labels.classifier = torch.nn.Linear(32, 3)
    deltatune.attach(three_labels, deltatune.LoRA(r=2), task="three").save_delta(tmp_path / "d")
    model = deltatune.load_delta(make_model("bert"), tmp_path / "d")
    assert model.task_parameters()["classifier.weight"].shape == (3, 32)


# ---- pickles ----------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a hostile pickle does: call a function while being loaded
        return (Path.touch, (self.marker,))


def test_pickle_delta_loads_only_when_trusted(tmp_path):
    model = deltatune.attach(make_model("bert"), deltatune.LoRA(r=2), task="pickled")
    with torch.no_grad():
        for tensor in model.task_parameters().values():
            tensor.normal_()
    model.save_delta(tmp_path / "d")
    expected = load_file(tmp_path / "d" / WEIGHTS_FILE)
    (tmp_path / "d" / WEIGHTS_FILE).unlink()
    torch.save(expected, tmp_path / "d" / "delta.bin")
    with pytest.raises(DeltaError, match="pickle files can run code.*--trust-pickle"):
        deltatune.load_delta(make_model("bert"), tmp_path / "d")
    loaded = deltatune.load_delta(make_model("bert"), tmp_path / "d", trust_pickle=True)
    for key, value in loaded.task_parameters().items():
        assert torch.equal(value.detach(), expected[key]), key


@pytest.mark.parametrize("content", ["code", "not a dict", "garbage"])
def test_trusted_pickle_still_runs_no_code_and_must_hold_tensors(tmp_path, content):
    deltatune.attach(make_model("bert"), deltatune.LoRA(r=2), task="p").save_delta(tmp_path / "d")
    (tmp_path / "d" / WEIGHTS_FILE).unlink()
    marker = tmp_path / "code-ran"
    payload = {"code": lambda: pickle.dumps({"x": _RunsCode(marker)}, protocol=2),
               "not a dict": lambda: pickle.dumps([torch.zeros(2)], protocol=2),
               "garbage": lambda: b"\x80\x04not a pickle"}[content]()
    (tmp_path / "d" / "delta.pt").write_bytes(payload)
    model = deltatune.DeltaModel(make_model("bert"))
    before = snapshot(model)
    with pytest.raises(DeltaError, match="delta.pt"):
        model.add_delta(tmp_path / "d", trust_pickle=True)
    assert not marker.exists()
    assert_unchanged(model, before)


# ---- saves interrupted at every step ------------------------------------------------------------
# the steps of write_delta/atomic_folder that touch the disk; a fault is injected before any one call
SAVE_STEPS = [(io, "save_file"), (Path, "write_text"), (os, "fsync"), (os, "rename"), (shutil, "rmtree")]
KILLED = 77  # exit status of a child killed at a step


def versioned(version: int, size: int = 64) -> tuple[dict[str, torch.Tensor], dict]:
    """A delta whose every value is `version`: a mix of two versions shows as unequal values."""
    tensors = {f"layer{i}.weight": torch.full((size,), float(version)) for i in range(3)}
    meta = {"format": FORMAT, "task": "t", "method": "full", "config": {}, "label_names": None, "head_keys": [],
            "base": {}, "version": version}
    return tensors, meta


def assert_complete(path: Path, versions: set[int]) -> int:
    """`path` holds one whole delta of one of `versions`; returns which."""
    tensors, meta = read_delta(path)
    assert meta["version"] in versions
    assert all(torch.all(t == meta["version"]) for t in tensors.values()), "a mix of two saves"
    return meta["version"]


class fault_before_step:
    """Within the block, call `fault(step name)` just before the disk step number `at` (0-based);
    `steps` lists the names of the steps reached."""

    def __init__(self, at: int, fault):
        self.at, self.fault, self.steps = at, fault, []
        self.originals = [(owner, name, getattr(owner, name)) for owner, name in SAVE_STEPS]

    def __enter__(self):
        for owner, name, original in self.originals:
            setattr(owner, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in self.originals:
            setattr(owner, name, original)

    def _wrap(self, name, original):
        def step(*args, **kwargs):
            self.steps.append(name)
            if len(self.steps) == self.at + 1:  # once: the cleanup after an injected fault runs normally
                self.fault(name)
            return original(*args, **kwargs)

        return step


def count_steps(tmp_path: Path, overwrite: bool) -> list[str]:
    path = tmp_path / "count" / "d"
    if overwrite:
        write_delta(path, *versioned(1))
    with fault_before_step(-1, None) as run:
        write_delta(path, *versioned(2))
    shutil.rmtree(path.parent)
    return run.steps


class InjectedFault(OSError):
    pass


def inject(name: str):
    raise InjectedFault(f"injected before {name}")


def die(name: str):
    os._exit(KILLED)  # like SIGKILL: no except/finally runs, nothing is cleaned up


@pytest.mark.parametrize("overwrite", [True, False], ids=["over-an-old-delta", "new-path"])
def test_a_save_makes_its_files_durable_before_renaming_them_into_place(tmp_path, monkeypatch, overwrite):
    """Every file, then the folder holding them, is fsynced before the rename that publishes them, and the
    parent folder after it (else a power cut can leave a renamed folder of empty files)."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def rename(source, destination):
        events.append(("rename", str(source), str(destination)))
        return real_rename(source, destination)

    path = tmp_path / "d"
    if overwrite:
        write_delta(path, *versioned(1))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    write_delta(path, *versioned(2))
    published = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(path))
    temporary = events[published][1]
    synced = [e[1] for e in events[:published] if e[0] == "fsync"]
    assert sorted(synced[:-1]) == sorted(f"{temporary}/{name}" for name in os.listdir(path))  # each file
    assert synced[-1] == temporary  # then the folder holding them
    assert events[-1] == ("fsync", str(tmp_path))  # the renames made durable in the parent folder


@pytest.mark.parametrize("overwrite", [True, False], ids=["over-an-old-delta", "new-path"])
@pytest.mark.parametrize("mode", ["exception", "killed"])
def test_a_save_interrupted_at_any_step_keeps_the_old_delta(tmp_path, overwrite, mode):
    steps = count_steps(tmp_path, overwrite)
    assert steps.count("rename") == (2 if overwrite else 1) and "save_file" in steps
    for at in range(len(steps) + 1):  # before each step, and (killed) after the last one
        folder = tmp_path / f"at{at}"
        path = folder / "d"
        folder.mkdir()
        if overwrite:
            write_delta(path, *versioned(1))
        if mode == "exception":
            if at == len(steps) or steps[at] == "rmtree":
                continue  # no step left to fail; rmtree(ignore_errors=True) does not raise
            with fault_before_step(at, inject), pytest.raises(InjectedFault):
                write_delta(path, *versioned(2))
        else:
            pid = os.fork()
            if pid == 0:  # the child saves and dies at the step; it never returns into pytest
                try:
                    with fault_before_step(at, die):
                        write_delta(path, *versioned(2))
                    die("the end")
                finally:
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == KILLED, f"the child failed before step {at}"
        if overwrite or path.exists():
            assert_complete(path, {1, 2} if overwrite else {2})
        write_delta(path, *versioned(3))  # the next save works and cleans up what the killed one left
        assert [p.name for p in folder.iterdir()] == ["d"]
        assert_complete(path, {3})


def test_a_save_killed_at_random_times_leaves_the_old_or_the_new_delta(tmp_path):
    """A child process saves a 12 MB delta in a loop; SIGKILL it at random moments, several times."""
    path, rng = tmp_path / "d", random.Random(0)
    write_delta(path, *versioned(0))
    version, interrupted = 0, 0
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                for next_version in range(version + 1, version + 10_000):
                    write_delta(path, *versioned(next_version, size=2**20))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        interrupted += any(p.name != "d" for p in tmp_path.iterdir())  # killed mid-save: it left a folder
        version = assert_complete(path, set(range(version, version + 10_000)))
    assert interrupted >= 4, "the kills should land while a save is running"
    write_delta(path, *versioned(version + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# ---- training: killed, stopped, resumed -----------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny BERT classifier folder and a 128-row sentiment csv (as in test_train), plus a tiny BERT
    regression folder and a csv of scores."""
    folder = tmp_path_factory.mktemp("workspace")
    for name, kind in [("model", "classification"), ("regression-model", "regression")]:
        make_model("bert", kind=kind).save_pretrained(folder / name)
        tiny_tokenizer().save_pretrained(folder / name)
    generator = torch.Generator().manual_seed(0)
    with open(folder / "reviews.csv", "w", newline="") as reviews, \
            open(folder / "scores.csv", "w", newline="") as scores:
        reviews_csv, scores_csv = csv.writer(reviews), csv.writer(scores)
        reviews_csv.writerow(["review", "sentiment"])
        scores_csv.writerow(["review", "score"])
        for i in range(128):
            words = ["great", "charming", "moving", "funny"] if i % 2 else ["terrible", "bleak", "weak", "desperate"]
            text = f"the movie was {words[int(torch.randint(4, (1,), generator=generator))]} ."
            reviews_csv.writerow([text, "positive" if i % 2 else "negative"])
            scores_csv.writerow([text, f"{4 * (i % 2) + 0.5:.1f}"])
    return folder


def train_command(workspace: Path, out: Path) -> list[str]:
    return ["train", "--model", str(workspace / "model"), "--task", "csv", "--method", "lora", "--out", str(out),
            "--data-file", str(workspace / "reviews.csv"), "--text-columns", "review", "--label-column", "sentiment",
            "--max-steps", "60", "--batch-size", "8", "--lr", "5e-3", "--seed", "3", "--checkpoint-every", "5",
            "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli_main(train_command(workspace, out)) == 0
    return load_file(out / "delta" / WEIGHTS_FILE)


def launch(workspace: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`python -m deltatune.cli train ...` in a child process (stderr to OUT.stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "deltatune.cli", *train_command(workspace, out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out.parent / f"{out.name}.stderr", "w"))


def wait_for_checkpoint(process: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> int:
    """Poll until OUT/checkpoint holds step >= `step`; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            saved = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
            if saved >= step:
                return saved
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert process.poll() is None, (out.parent / f"{out.name}.stderr").read_text()[-3000:]
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def test_train_killed_then_stopped_then_resumed_ends_with_the_uninterrupted_delta(workspace, uninterrupted,
                                                                                 tmp_path):
    """SIGKILL a fresh run after its checkpoint at step >= 10; resume it in a new process and SIGTERM that
    one (it saves a checkpoint and says so); resume again to the end: the delta of a run never stopped."""
    out = tmp_path / "run"
    process = launch(workspace, out)
    wait_for_checkpoint(process, out, 10)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL

    process = launch(workspace, out, "--resume")
    wait_for_checkpoint(process, out, 30)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    stderr = (tmp_path / "run.stderr").read_text()
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("deltatune: stopped by SIGTERM at step ") and "checkpoint saved in" in last, last
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == stopped_at
    assert not (out / "summary.json").exists(), "the run ended before it was stopped"

    assert cli_main([*train_command(workspace, out), "--resume"]) == 0
    resumed = load_file(out / "delta" / WEIGHTS_FILE)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


# ---- numerical faults ---------------------------------------------------------------------------
def small_run(workspace: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(model=str(workspace / "model"), task="csv", method="lora", out=str(out), max_steps=8, batch_size=8,
                  lr=5e-3, seed=3, progress=False, log_every=1,
                  task_options={"path": str(workspace / "reviews.csv"), "text_columns": ["review"],
                                "label_column": "sentiment"})
    return TrainConfig(**{**values, **overrides})


def nan_at_step(monkeypatch, bad_step: int) -> None:
    """The loss becomes NaN at one optimizer step (one batch: grad_accum is 1)."""
    calls = {"n": 0}
    real_loss = train_module.task_loss

    def loss(task, outputs, labels):
        calls["n"] += 1
        value = real_loss(task, outputs, labels)
        return value * math.nan if calls["n"] == bad_step + 1 else value

    monkeypatch.setattr(train_module, "task_loss", loss)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 5)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; the last good"):
        train(small_run(workspace, tmp_path / "run", checkpoint_every=2))
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "checkpoint" / WEIGHTS_FILE).values())


def test_nonfinite_loss_can_skip_the_batch(workspace, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 5)
    summary = train(small_run(workspace, tmp_path / "run", on_nonfinite="skip"))
    assert summary["steps"] == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 5, "skipped": "non-finite loss"} in records
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "delta" / WEIGHTS_FILE).values())


def test_a_huge_learning_rate_is_reported_as_an_exploding_loss(workspace, tmp_path):
    """Regression (squared error, unbounded) with lr 1000 reached by warmup: the loss grows x1e10."""
    config = small_run(workspace, tmp_path / "run", model=str(workspace / "regression-model"), max_steps=40,
                       lr=1000.0, warmup_ratio=0.9,
                       task_options={"path": str(workspace / "scores.csv"), "text_columns": ["review"],
                                     "label_column": "score"})
    with pytest.raises(TrainingError, match=r"loss exploded at step \d+: .*"
                                                   r"lower the learning rate \(now 1000.0\)"):
        train(config)
