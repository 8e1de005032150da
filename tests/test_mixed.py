"""Mixed-task batches: `model(**batch, tasks=[...])` runs each example with its own task's delta in one pass.

The reference for every example is the same example run alone (batch of one, unpadded) after
`use(task)`. Each method gets two tasks with different shapes (ranks, targets, bottlenecks, activations,
prompt lengths) so that zero padding and "no delta here" rows are exercised, plus "base" examples.
"""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.core import component as common
from deltatune.errors import DeltaTuneError, TaskError
from deltatune.methods.registry import METHODS
from deltatune.testing import tiny_model

ARCHS = ["bert", "gpt2", "llama", "t5"]
BIASLESS = {"llama", "t5"}
OUTPUT_PROJECTION = {"bert": "attention.output.dense", "gpt2": "attn.c_proj", "llama": "o_proj",
                     "t5": "SelfAttention.o"}


def two_tasks(arch: str, method: str) -> dict[str, object]:
    """Two configs of one method that differ in shape."""
    if method == "lora":  # the second adapts only the output projections: the q/v layers have one task
        return {"lora_a": deltatune.LoRA(r=2, alpha=4),
                "lora_b": deltatune.LoRA(r=4, alpha=8, targets=[OUTPUT_PROJECTION[arch]])}
    if method == "dora":  # LoRA's shapes: a DoRA task shares the q/v layers with no other
        return {"dora_a": deltatune.DoRA(r=2, alpha=4),
                "dora_b": deltatune.DoRA(r=4, alpha=8, targets=[OUTPUT_PROJECTION[arch]])}
    if method == "ia3":  # the second rescales only the output projections' outputs, no FFN input
        return {"ia3_a": deltatune.IA3(), "ia3_b": deltatune.IA3(targets=[OUTPUT_PROJECTION[arch]], feedforward=[])}
    if method == "bitfit":
        return {"bitfit_a": deltatune.BitFit(add_missing=arch in BIASLESS),
                "bitfit_b": deltatune.BitFit(add_missing=arch in BIASLESS)}
    if method == "adapter":
        return {"adapter_a": deltatune.Adapter(bottleneck=4),
                "adapter_b": deltatune.Adapter(bottleneck=8, activation="relu", placement="pfeiffer")}
    if method == "adapter_lin":  # Lin et al.'s adapters (own LayerNorm per task), one of them AdapterDrop
        return {"lin_a": deltatune.Adapter(bottleneck=4, placement="lin"),
                "lin_b": deltatune.Adapter(bottleneck=6, placement="lin", activation="relu", skip_layers=1)}
    if method == "adapter_drop":
        return {"drop_a": deltatune.Adapter(bottleneck=4, skip_layers=1),
                "drop_b": deltatune.Adapter(bottleneck=8, placement="pfeiffer", skip_layers=1, train_norms=False)}
    if method == "top_layers":  # the tiny models have 2 blocks: top 1 and both
        return {"top_a": deltatune.TopLayers(k=1), "top_b": deltatune.TopLayers(k=2)}
    if method == "prompt":
        return {"prompt_a": deltatune.PromptTuning(length=3), "prompt_b": deltatune.PromptTuning(length=6)}
    config = METHODS[method].config  # a method added later: two tasks with its default settings
    return {f"{method}_a": config(), f"{method}_b": config()}


def randomise(model: deltatune.DeltaModel, task: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def make_model(arch: str, kind: str = "classification", num_labels: int = 2):
    """The same tiny base for the same arguments; heads of other widths on the same body."""
    torch.manual_seed(0)
    return tiny_model(arch, kind, num_labels=num_labels)


def build(arch: str, configs: dict[str, object], kind: str = "classification") -> deltatune.DeltaModel:
    model = make_model(arch, kind=kind)
    for index, (task, config) in enumerate(configs.items()):
        model = deltatune.attach(model, config, task=task)
        randomise(model, task, seed=index)
    return model


def padded_batch(count: int, seed: int = 3) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Right-padded examples of different lengths (each ends with </s>, which T5 classification reads)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [4 + (5 * i) % 7 for i in range(count)]
    input_ids = torch.zeros(count, max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = torch.randint(4, 500, (length,), generator=generator)
        input_ids[i, length - 1] = 1
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, lengths


@torch.no_grad()
def alone(model: deltatune.DeltaModel, batch: dict, lengths: list[int], tasks: list[str]) -> list[torch.Tensor]:
    """Each example's logits run by itself, unpadded, after use(its task)."""
    outputs = []
    for i, task in enumerate(tasks):
        model.use(task)
        outputs.append(model(**{k: v[i : i + 1, : lengths[i]] for k, v in batch.items()}).logits[0])
    return outputs


def assert_mixed_matches_alone(model, tasks: list[str]) -> torch.Tensor:
    batch, lengths = padded_batch(len(tasks))
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    for i, expected in enumerate(alone(model, batch, lengths, tasks)):
        labels = expected.shape[-1]
        torch.testing.assert_close(mixed[i, :labels], expected, atol=1e-5, rtol=0, msg=f"example {i} ({tasks[i]})")
    return mixed


@pytest.mark.parametrize("path", ["gather", "decode"])
@pytest.mark.parametrize("method", [name for name, entry in METHODS.items() if entry.mixable]
                         + ["adapter_lin", "adapter_drop"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_example_alone(arch, method, path, monkeypatch):
    """Every way a mixed inference pass can run: each row gathering its own task's weights (what training does),
    and the decode steps' ways: every task's update on every row with the others' masked (LoRA,
    `DeltaComponent.dense_mixed`), each task once on its own rows sorted by task (adapters, `grouped_mixed`)."""
    monkeypatch.setattr(common, "DENSE_MIXED_LIMIT", 10**6 if path == "decode" else 0)
    monkeypatch.setattr(common, "GROUPED_MIXED", path == "decode")
    configs = two_tasks(arch, method)
    model = build(arch, configs)
    first, second = configs
    active = model.active_task
    assert_mixed_matches_alone(model.use(active), [first, second, "base", second, first, "base", first])
    assert model.task_state.per_example is None


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_in_one_batch_with_heads_of_different_widths(arch, tmp_path):
    configs = {**two_tasks(arch, "lora"), "bitfit": deltatune.BitFit(add_missing=arch in BIASLESS),
               "adapter": deltatune.Adapter(bottleneck=4), "prompt": deltatune.PromptTuning(length=4),
               "lin": deltatune.Adapter(bottleneck=3, placement="lin", skip_layers=1),
               "top": deltatune.TopLayers(k=1), "dora": deltatune.DoRA(r=3), "ia3": deltatune.IA3()}
    model = build(arch, configs)
    # a task whose head has 3 labels, saved from a 3-label copy of the base and loaded beside the others
    three = deltatune.attach(make_model(arch, num_labels=3), deltatune.LoRA(r=2), task="three")
    randomise(three, "three", seed=9)
    three.save_delta(tmp_path / "three")
    model.add_delta(tmp_path / "three")
    tasks = ["three", "lora_a", "bitfit", "top", "base", "adapter", "prompt", "lin", "lora_b", "three", "prompt", "top",
             "dora", "ia3", "dora"]
    mixed = assert_mixed_matches_alone(model, tasks)
    assert mixed.shape[-1] == 3
    two_label = [i for i, task in enumerate(tasks) if task != "three"]
    assert torch.isneginf(mixed[two_label, 2]).all() and torch.isfinite(mixed[[0, 9]]).all()
    assert (mixed.softmax(-1)[two_label, 2] == 0).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_components_none_of_whose_tasks_is_in_the_batch_take_their_base_path(arch, monkeypatch):
    """A served model holds deltas of many methods; a step whose rows are LoRA tasks and the base does not run the
    other methods' mixed paths (they would add zeros), and gives each row's output alone. While gradients are
    recorded every component still runs (each task's parameters get their zero gradient)."""
    configs = {**two_tasks(arch, "lora"), "bitfit": deltatune.BitFit(add_missing=arch in BIASLESS),
               "adapter": deltatune.Adapter(bottleneck=4), "lin": deltatune.Adapter(bottleneck=3, placement="lin"),
               "dora": deltatune.DoRA(r=3), "ia3": deltatune.IA3()}
    model = build(arch, configs)
    stacked, built = common.DeltaComponent.stacked, []
    monkeypatch.setattr(common.DeltaComponent, "stacked",
                        lambda self, *args: built.append(type(self).__name__) or stacked(self, *args))
    assert_mixed_matches_alone(model, ["lora_a", "base", "lora_b", "lora_a"])
    assert built and set(built) == {"LoRALinear"}
    built.clear()
    batch = {"input_ids": torch.randint(5, 90, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    model.train()(**batch, tasks=["lora_a", "base", "lora_b"]).logits.sum().backward()
    assert {"DoRAMagnitude", "BiasDelta", "BottleneckAdapter", "IA3Scales"} <= set(built)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_prompts_of_different_lengths_keep_tokens_aligned(arch):
    """Decoders pad before the prompt: every example's own tokens sit at the same positions of the logits."""
    model = build(arch, {"short": deltatune.PromptTuning(length=2), "long": deltatune.PromptTuning(length=5),
                         "lora": deltatune.LoRA(r=2)}, kind="causal-lm")
    tasks = ["long", "short", "base", "lora", "short"]
    batch, lengths = padded_batch(len(tasks))
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    offset = mixed.shape[1] - batch["input_ids"].shape[1]  # the longest prompt
    assert offset == 5
    for i, expected in enumerate(alone(model, batch, lengths, tasks)):
        own = expected[-lengths[i] :]  # logits at the example's own tokens (after its prompt, if any)
        torch.testing.assert_close(mixed[i, offset : offset + lengths[i]], own, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("pad", [False, True])
def test_rows_grouped_by_task_each_meet_their_own_weights(tokens, pad):
    """TaskGroups: rows [2, 0, 3, 2, 0, 1] over 3 tasks (3: the zero row, no weights here) group as rows 1, 4
    (task 0), 5 (task 1), 0, 3 (task 2); padded, in slots of 2 per task with slot 3 padding. grouped_matmul
    equals each row times its own task's matrix, in both layouts."""
    rows = torch.tensor([2, 0, 3, 2, 0, 1])
    groups = common.TaskGroups.of(rows, tasks=3, pad=pad)
    assert groups.targets.tolist() == [1, 4, 5, 0, 3]
    if pad:
        assert groups.padded == 2 and groups.rows.tolist() == [0, 0, 1, 1, 2, 2]
        assert groups.kept.tolist() == [0, 1, 2, 4, 5] and groups.order[groups.kept].tolist() == [1, 4, 5, 0, 3]
    else:
        assert groups.padded is None and groups.kept is None and groups.order.tolist() == [1, 4, 5, 0, 3]
        assert groups.rows.tolist() == [0, 0, 1, 2, 2] and groups.offsets.tolist() == [2, 3, 5]
    x, weights, bias = torch.randn(6, tokens, 8), torch.randn(3, 8, 4), torch.randn(4, 4)  # bias: 3 tasks + zero row
    slots = groups.order if pad else groups.targets
    got = common.grouped_matmul(x[slots], weights, groups, bias)
    got = got[groups.kept] if pad else got
    expected = torch.stack([x[row] @ weights[task] + bias[task]
                            for row, task in zip([1, 4, 5, 0, 3], [0, 0, 1, 2, 2], strict=True)])
    torch.testing.assert_close(got, expected)
    lopsided = common.TaskGroups.of(torch.tensor([0, 0, 0, 1]), tasks=3, pad=True)  # 3 x 3 slots for 4 rows: runs
    assert lopsided.padded is None and lopsided.offsets.tolist() == [3, 4, 4]
    assert common.grouped_width(6, torch.float32) == 8 and common.grouped_width(6, torch.bfloat16) == 8
    assert common.grouped_width(12, torch.bfloat16) == 16 and common.grouped_width(64, torch.float32) == 64


@pytest.mark.parametrize("method", ["adapter", "adapter_lin"])
def test_one_token_rows_take_the_padded_layout_and_match_each_row_alone(method, monkeypatch):
    """A decode step's shape (one token per row): adapters group the rows padded (3 rows of one task, 2 of the
    other, one without: 6 slots, one of them padding); each row's logits equal the row run alone."""
    built = []
    group_rows = common.TaskGroups.of
    monkeypatch.setattr(common.TaskGroups, "of", lambda *args: built.append(group_rows(*args)) or built[-1])
    model = build("llama", two_tasks("llama", method), kind="causal-lm")
    first, second = two_tasks("llama", method)
    tasks = [first, second, "base", second, first, first]
    ids = torch.arange(5, 5 + len(tasks))[:, None]  # (B, 1)
    with torch.no_grad():
        mixed = model(input_ids=ids, tasks=tasks).logits
        for i, task in enumerate(tasks):
            alone = model.use(task)(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0, msg=f"row {i} ({task})")
    two_task_sites = [groups for groups in built if groups.rows.max() == 1]  # (AdapterDrop: one task in block 0)
    assert two_task_sites and all(g.padded == 3 and g.kept.tolist() == [0, 1, 2, 3, 4] for g in two_task_sites)
    assert len(built) <= 2  # once per forward pass for each task list, not once per layer


def test_one_task_for_all_takes_the_single_task_path():
    model = build("bert", two_tasks("bert", "lora"))
    batch, _ = padded_batch(4)
    with torch.no_grad():
        expected = model.use("lora_b")(**batch).logits
        model.use("lora_a")
        assert torch.equal(model(**batch, tasks=["lora_b"] * 4).logits, expected)
    assert model.active_task == "lora_a"


def test_stacks_follow_in_place_updates_and_reloaded_tasks(tmp_path):
    model = build("bert", two_tasks("bert", "lora"))
    tasks = ["lora_a", "lora_b", "base", "lora_a"]
    assert_mixed_matches_alone(model, tasks)  # stacks built and cached (no_grad)
    randomise(model, "lora_a", seed=11)  # in place, as an optimizer step
    assert_mixed_matches_alone(model, tasks)
    other = build("bert", {"lora_a": deltatune.LoRA(r=3, alpha=3)})
    randomise(other, "lora_a", seed=12)
    other.save_delta(tmp_path / "a")
    model.remove_task("lora_a")
    model.add_delta(tmp_path / "a")  # same name, another rank and other values
    assert_mixed_matches_alone(model, tasks)


def test_a_merged_task_is_unmerged_for_a_mixed_batch():
    """The reference is a twin never merged (built from the same seeds): an unmerge that does not restore W
    would corrupt the merged model's own one-by-one reference as well."""
    tasks = ["lora_a", "base", "lora_b"]
    model, twin = (build("bert", two_tasks("bert", "lora")) for _ in range(2))
    model.use("lora_a").merge()
    batch, lengths = padded_batch(len(tasks))
    with torch.no_grad():
        mixed = model(**batch, tasks=tasks).logits
    assert model.merged_task is None
    for i, expected in enumerate(alone(twin, batch, lengths, tasks)):
        torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0, msg=f"example {i} ({tasks[i]})")
    assert_mixed_matches_alone(model, tasks)  # and the unmerged model keeps answering like its twin
    for i, expected in enumerate(alone(twin, batch, lengths, tasks)):
        torch.testing.assert_close(alone(model, batch, lengths, tasks)[i], expected, atol=1e-5, rtol=0)


def test_gradients_reach_each_task_in_a_mixed_batch():
    model = build("bert", {**two_tasks("bert", "lora"), **two_tasks("bert", "adapter"), "p": deltatune.PromptTuning(2)})
    model.train()
    for task in model.tasks:
        for tensor in model.task_parameters(task).values():
            tensor.requires_grad_(True)
    batch, _ = padded_batch(4)
    tasks = ["lora_a", "adapter_b", "p", "base"]
    model(**batch, tasks=tasks).logits.sum().backward()
    for task in model.tasks:
        grads = [t.grad for t in model.task_parameters(task).values()]
        has_gradient = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert has_gradient == (task in tasks), task


def test_mixed_batch_errors_are_clear():
    model = build("bert", {**two_tasks("bert", "lora"), "full": deltatune.FullFineTune()})
    batch, _ = padded_batch(3)
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['nope'\].*lora_a"):
        model(**batch, tasks=["lora_a", "nope", "base"])
    with pytest.raises(TaskError, match="for a batch of 3"):
        model(**batch, tasks=["lora_a", "base"])
    with pytest.raises(TaskError, match="one task name per example"):
        model(**batch, tasks="lora_a")
    with pytest.raises(DeltaTuneError, match="full fine-tuning tasks \\['full'\\] cannot be mixed"):
        model(**batch, tasks=["lora_a", "full", "base"])
    model.use("full")  # the model's weights are the full task's now
    with pytest.raises(DeltaTuneError, match="holds the weights of full fine-tuning task 'full'"):
        model(**batch, tasks=["lora_a", "lora_b", "base"])
    model.use("base")
    assert_mixed_matches_alone(model, ["lora_a", "lora_b", "base"])
    assert model.task_state.per_example is None
