"""Preference tuning (training/preference.py, tasks/preference.py) on a tiny Llama: the DPO and SimPO losses against
hand-computed ones, the one-pass reference log-probs against the base model's own (bit for bit, fp32), the policy
starting at zero margin, full fine-tuning's second pass, preference files, and `deltatune train --objective dpo`
end to end (with --reference and --resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_generation import chat_tokenizer, tiny_chat_model, write_jsonl  # noqa: F401 (a fixture)

import deltatune
from deltatune.errors import DataError, TrainingError
from deltatune.tasks.generation import PromptFormat
from deltatune.tasks.preference import encode_pairs, preference_file_task
from deltatune.testing import tiny_model
from deltatune.training.preference import PreferenceObjective, prepare_policy

PAIRS = [{"prompt": "name[R1], food[Thai]", "chosen": " R1 serves Thai food.", "rejected": " R1 serves pizza."},
         {"prompt": "name[Aromi], area[centre]", "chosen": " Aromi is in the centre.", "rejected": " Aromi is."}]
CONFIGS = {"lora": deltatune.LoRA(r=2, alpha=4), "dora": deltatune.DoRA(r=2, alpha=4), "ia3": deltatune.IA3(),
           "adapter": deltatune.Adapter(bottleneck=4), "bitfit": deltatune.BitFit(add_missing=True),
           "prompt": deltatune.PromptTuning(length=3), "prefix": deltatune.PrefixTuning(length=3),
           "top_layers": deltatune.TopLayers(k=1), "full": deltatune.FullFineTune()}


def encoded_pairs(tokenizer, pairs=PAIRS):
    examples = [{**pair, "where": f"row {i}"} for i, pair in enumerate(pairs)]
    return encode_pairs(PromptFormat("prompt-completion"), examples, tokenizer, 64)


def policy_model(method: str, randomise: bool = True) -> deltatune.DeltaModel:
    """A tiny Llama with `method`'s delta as task "policy", its parameters moved off their start (or not)."""
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model("llama", "causal-lm"), CONFIGS[method], task="policy")
    if randomise:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for tensor in model.trained_parameters("policy").values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def by_hand_log_probs(model, task, ids: list[int], labels: list[int]) -> float:
    """log pi(answer | prompt) of one sequence alone: the full logits, log-softmax, the answer tokens summed."""
    model.use(task)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t, label].item() for t, label in enumerate(labels[1:]) if label != -100)


def test_dpo_loss_equals_eq7_computed_by_hand():
    tokenizer, model = chat_tokenizer(), policy_model("lora")
    pairs = encoded_pairs(tokenizer)
    objective = PreferenceObjective("dpo", beta=0.5, policy="policy")
    with torch.no_grad():
        loss = objective.loss(model, model, pairs, tokenizer.pad_token_id, "cpu")
    beta, losses, margins = 0.5, [], []
    for pair in pairs:
        ratio = {side: by_hand_log_probs(model, "policy", *getattr(pair, side))
                 - by_hand_log_probs(model, None, *getattr(pair, side)) for side in ("chosen", "rejected")}
        margin = beta * (ratio["chosen"] - ratio["rejected"])
        losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin), Rafailov et al. 2023 eq. 7
        margins.append(margin)
    assert loss.item() == pytest.approx(sum(losses) / 2, abs=1e-5)
    assert objective.logged["rewards/margins"] == pytest.approx(sum(margins) / 2, abs=1e-5)
    assert objective.logged["rewards/accuracies"] == sum(m > 0 for m in margins) / 2
    assert abs(sum(margins)) > 1e-3  # the delta really moved the policy off the reference


def test_simpo_loss_equals_the_length_normalised_margin_by_hand():
    tokenizer, model = chat_tokenizer(), policy_model("lora")
    pairs = encoded_pairs(tokenizer)
    objective = PreferenceObjective("simpo", beta=2.0, policy="policy", simpo_gamma=0.5)
    with torch.no_grad():
        loss = objective.loss(model, model, pairs, tokenizer.pad_token_id, "cpu")
    expected = []
    for pair in pairs:
        average = {side: by_hand_log_probs(model, "policy", *getattr(pair, side))
                   / sum(label != -100 for label in getattr(pair, side)[1][1:]) for side in ("chosen", "rejected")}
        expected.append(math.log1p(math.exp(-(2.0 * (average["chosen"] - average["rejected"]) - 0.5))))
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter", "bitfit", "prompt", "prefix", "top_layers",
                                    "full"])
def test_reference_log_probs_are_the_base_models_own_bit_for_bit(method):
    """One pass (mixable methods) or a second pass (full): the reference rows are the base's, the policy rows the
    policy's; and the policy's gradient is the one of the policy rows alone."""
    tokenizer, model = chat_tokenizer(), policy_model(method)
    pairs = encoded_pairs(tokenizer)
    objective = PreferenceObjective("dpo", beta=0.1, policy="policy")
    assert objective.mixes(model) == (method != "full")
    from deltatune.tasks.encoding import Encoded, collate

    batch = collate([Encoded(p.chosen[0], None, p.chosen[1]) for p in pairs]
                    + [Encoded(p.rejected[0], None, p.rejected[1]) for p in pairs], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        policy, reference = objective.log_probs(model, model, batch, labels)
        base_own, _ = model.use(None)(**batch, target_labels=labels, target_sums=True)
        policy_own, _ = model.use("policy")(**batch, target_labels=labels, target_sums=True)
    assert torch.equal(reference, base_own), (reference - base_own).abs().max()
    torch.testing.assert_close(policy, policy_own, atol=1e-5, rtol=1e-5)
    assert (policy - reference).abs().max() > 1e-4  # a reference computed under the delta would fail above
    assert model.active_task == "policy"


def test_a_fresh_policy_starts_at_zero_margin_and_log_2():
    tokenizer, model = chat_tokenizer(), policy_model("lora", randomise=False)  # LoRA's B = 0: the base
    objective = PreferenceObjective("dpo", beta=0.1, policy="policy")
    loss = objective.loss(model, model, encoded_pairs(tokenizer), tokenizer.pad_token_id, "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert objective.logged["rewards/margins"] == 0.0 and objective.logged["rewards/accuracies"] == 0.0


def test_a_policy_copied_from_its_reference_delta_starts_at_zero_margin(tmp_path):
    tokenizer = chat_tokenizer()
    policy_model("lora").save_delta(tmp_path / "sft")  # a trained SFT delta, as --reference takes it
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model("llama", "causal-lm"), deltatune.LoRA(r=2), task="policy")
    reference = prepare_policy(model, "policy", tmp_path / "sft", "lora")
    assert model.active_task == "policy" and reference == "reference"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.trained_parameters("policy").values()}
    objective = PreferenceObjective("dpo", beta=0.1, policy="policy", reference=reference)
    loss = objective.loss(model, model, encoded_pairs(tokenizer), tokenizer.pad_token_id, "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert objective.logged["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert objective.logged["logps/chosen"] != pytest.approx(by_hand_log_probs(model, None, *encoded_pairs(
        tokenizer)[0].chosen), abs=1e-3)  # the reference is the SFT delta, not the base
    model.use("policy")
    with pytest.raises(TrainingError, match="--method lora"):
        prepare_policy(deltatune.attach(tiny_model("llama", "causal-lm"), deltatune.IA3(), task="p"), "p",
                       tmp_path / "sft", "ia3")


def test_preference_files_text_and_messages(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", PAIRS * 10)
    task = preference_file_task("jsonl", text)
    assert task.prompt_format.format == "prompt-completion" and len(task.load("train")) == 18
    conversation = [{"role": "user", "content": "name[R1]"}]
    rows = [{"chosen": conversation + [{"role": "assistant", "content": "R1."}],
             "rejected": conversation + [{"role": "assistant", "content": "R2."}]}] * 10
    task = preference_file_task("jsonl", write_jsonl(tmp_path / "chat.jsonl", rows))
    assert task.prompt_format.format == "messages" and task.prompt_format.assistant_turns == "last"
    pair, = encode_pairs(task.prompt_format, task.load("train")[:1], chat_tokenizer(), 64)
    tokenizer = chat_tokenizer()
    answer = [t for t in pair.chosen[1] if t != -100]
    assert tokenizer.decode(answer) == "R1.<|im_end|>"  # the last assistant turn with its end of turn only
    shared = [{"prompt": conversation, "chosen": [{"role": "assistant", "content": "R1."}],
               "rejected": [{"role": "assistant", "content": "R2."}]}] * 10
    other = preference_file_task("jsonl", write_jsonl(tmp_path / "shared.jsonl", shared))
    assert other.load("train")[0]["chosen"] == task.load("train")[0]["chosen"]


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "p", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share every turn"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0]] * 5 + [row] + [PAIRS[0]] * 5)
    with pytest.raises(DataError, match="line 6") as error:
        preference_file_task("jsonl", path)
    assert problem in str(error.value)


def test_same_answers_and_bad_objectives_are_refused():
    with pytest.raises(DataError, match="nothing to prefer"):
        encoded_pairs(chat_tokenizer(), [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(TrainingError, match="beta"):
        PreferenceObjective("dpo", beta=0.0, policy="p")


def _train(model_folder, data, out, *extra):
    from deltatune.cli import main

    return main(["train", "--model", str(model_folder), "--task", "jsonl", "--data-file", str(data), "--method",
                 "lora", "--out", str(out), "--batch-size", "4", "--no-progress", "--precision", "fp32",
                 "--log-every", "1", "--lr", "5e-3", *extra])


def test_cli_dpo_logs_rewards_resumes_exactly_and_starts_from_its_reference(tmp_path, tiny_chat_model):  # noqa: F811
    rows = [{"chosen": [{"role": "user", "content": f"name[R{i}], food[Thai]"},
                        {"role": "assistant", "content": f"R{i} serves Thai food."}],
             "rejected": [{"role": "user", "content": f"name[R{i}], food[Thai]"},
                          {"role": "assistant", "content": f"R{i} serves pizza."}]} for i in range(20)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert _train(tiny_chat_model, data, tmp_path / "whole", "--objective", "dpo", "--max-steps", "4") == 0
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/margins" in r and "eval" not in r]
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0  # it learnt to prefer the chosen answers
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert set(summary["final"]) >= {"rewards/accuracies", "rewards/margins", "loss"}
    meta = json.loads((tmp_path / "whole" / "delta" / "delta.json").read_text())
    assert meta["prompt_format"]["format"] == "messages"  # generate/serve build the prompts it was tuned on

    # stopped after step 1 (its checkpoint), resumed: the steps of the uninterrupted run
    assert _train(tiny_chat_model, data, tmp_path / "split", "--objective", "dpo", "--max-steps", "4",
                  "--checkpoint-every", "1", "--max-seconds", "0.0001") == 0
    assert _train(tiny_chat_model, data, tmp_path / "split", "--objective", "dpo", "--max-steps", "4",
                  "--resume") == 0
    split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    split_steps = [r for r in split if "rewards/margins" in r and "eval" not in r]
    assert [r["step"] for r in split_steps] == [1, 2, 3, 4]  # resumed, not started again
    for resumed, straight in zip(split_steps, steps, strict=True):
        assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-6)
        assert resumed["rewards/margins"] == pytest.approx(straight["rewards/margins"], abs=1e-6)

    # --reference: the policy starts as a copy of the given delta (margin 0), which need not be the base
    assert _train(tiny_chat_model, data, tmp_path / "ref", "--objective", "dpo", "--max-steps", "1",
                  "--reference", str(tmp_path / "whole" / "delta")) == 0
    first = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] != pytest.approx(steps[0]["logps/chosen"], abs=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_one_pass_over_a_quantized_base_gives_the_quantized_base_own_log_probs(scheme):
    from deltatune.core.quantize import SCHEMES, quantize_model
    from deltatune.tasks.encoding import Encoded, collate

    assert scheme in SCHEMES
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    try:
        base = quantize_model(tiny_model("llama", "causal-lm"), scheme)
    except Exception as error:  # noqa: BLE001 (a scheme whose kernel library is not installed here)
        pytest.skip(f"{scheme}: {error}")
    model = deltatune.attach(base, deltatune.LoRA(r=2), task="policy").eval()
    with torch.no_grad():
        for tensor in model.trained_parameters("policy").values():
            tensor.add_(0.2)
    pairs = encoded_pairs(tokenizer)
    batch = collate([Encoded(p.chosen[0], None, p.chosen[1]) for p in pairs]
                    + [Encoded(p.rejected[0], None, p.rejected[1]) for p in pairs], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    objective = PreferenceObjective("dpo", beta=0.1, policy="policy")
    with torch.no_grad():
        policy, reference = objective.log_probs(model, model, batch, labels)
        base_own, _ = model.use(None)(**batch, target_labels=labels, target_sums=True)
    torch.testing.assert_close(reference, base_own, atol=1e-5, rtol=1e-5)
    assert (policy - reference).abs().max() > 1e-4


def test_the_second_pass_option_gives_the_one_pass_log_probs():
    from deltatune.tasks.encoding import Encoded, collate

    tokenizer, model = chat_tokenizer(), policy_model("lora")
    pairs = encoded_pairs(tokenizer)
    batch = collate([Encoded(p.chosen[0], None, p.chosen[1]) for p in pairs]
                    + [Encoded(p.rejected[0], None, p.rejected[1]) for p in pairs], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    second = PreferenceObjective("dpo", beta=0.1, policy="policy", one_pass=False)
    assert not second.mixes(model)
    with torch.no_grad():
        one = PreferenceObjective("dpo", beta=0.1, policy="policy").log_probs(model, model, batch, labels)
        two = second.log_probs(model, model, batch, labels)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(one[1], two[1])  # the base's rows: the same numbers either way


def test_reference_pass_auto_is_the_second_pass_on_a_cpu_and_one_pass_on_cuda():
    from deltatune.training.loop import TrainConfig
    from deltatune.training.preference import resolve_reference_pass

    assert TrainConfig.__dataclass_fields__["reference_pass"].default == "auto"
    assert resolve_reference_pass("auto", cuda=False) == "second"
    assert resolve_reference_pass("auto", cuda=True) == "same"
    assert resolve_reference_pass("same", cuda=False) == "same"
    assert resolve_reference_pass("second", cuda=True) == "second"
    with pytest.raises(TrainingError, match="--reference-pass"):
        resolve_reference_pass("both")
