"""`deltatune serve` for generation, through the official `openai` client against a live server on 127.0.0.1.

A tiny Llama causal LM (ChatML tokenizer) carries deltas of every method whose rows can share a decode step.
References come from an independent path: a fresh model with one delta loaded by `load_delta`, generating one
prompt alone with transformers' `generate` (greedy), or the `deltatune generate` command. To make batching
deterministic, tests hold the decode thread (`loop.call(gate.wait)`) while requests queue up, then release it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import shutil
import threading
import time
import weakref

import httpx
import openai
import pytest
import torch
from test_generation import chat_tokenizer

import deltatune
from deltatune.errors import DeltaTuneError
from deltatune.serving.app import ServeConfig, build_engine
from deltatune.serving.packed_linear import prepacking_available
from deltatune.tasks.generation import PromptFormat
from deltatune.testing import BackgroundServer, tiny_model

CONFIGS = {
    "lora": deltatune.LoRA(r=2, alpha=4),
    "lora_wide": deltatune.LoRA(r=8, alpha=16),  # another rank in the same step
    "bitfit": deltatune.BitFit(add_missing=True),  # Llama has no biases
    "adapter": deltatune.Adapter(bottleneck=4),
    "prompt": deltatune.PromptTuning(length=3),
    "prefix": deltatune.PrefixTuning(length=2, hidden=8),
}
CHAT_FORMAT = {"format": "messages", "chat_template": None}  # filled with the tokenizer's (ChatML) when saved
# Alpaca's two prompts, short: the tiny model has 128 positions (the Stanford ones take 180 tokens here)
ALPACA_FORMAT = PromptFormat(format="alpaca", template="### Instruction:\n{instruction}\n### Input:\n{input}\n###:\n",
                             template_no_input="### Instruction:\n{instruction}\n###:\n")
PROMPTS = ["name[Aromi], food[Thai]", "the cat sat on", "hello", "a much longer prompt than the other ones are"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model folder, {task: delta folder}): the tiny chat Llama and one randomised delta per method, plus a chat
    delta (LoRA with a saved 'messages' prompt format), a top-layers and a full fine-tuning delta."""
    root = tmp_path_factory.mktemp("serve-generate")
    torch.manual_seed(0)
    folder = root / "tiny-llama"
    tiny_model("llama", "causal-lm").save_pretrained(folder)
    tokenizer = chat_tokenizer()
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(folder)

    chat_format = PromptFormat.from_dict(CHAT_FORMAT).resolve(tokenizer).to_dict()
    configs = {**CONFIGS, "chat": deltatune.LoRA(r=4), "alpaca": deltatune.LoRA(r=4),
               "top": deltatune.TopLayers(k=1), "full": deltatune.FullFineTune()}
    paths = {}
    for index, (task, config) in enumerate(configs.items()):
        torch.manual_seed(0)  # the weights of the saved folder
        model = deltatune.attach(tiny_model("llama", "causal-lm"), config, task=task)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for tensor in model.task_parameters(task).values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
        if task == "chat":
            model.task_info[task]["prompt_format"] = chat_format
        if task == "alpaca":
            model.task_info[task]["prompt_format"] = ALPACA_FORMAT.to_dict()
        paths[task] = model.save_delta(root / "deltas" / task)
    return folder, paths


@contextlib.contextmanager
def server(served, tasks=(*CONFIGS, "chat"), **settings):
    folder, paths = served
    loop = build_engine(str(folder), {task: paths[task] for task in tasks}, ServeConfig(**settings))
    with BackgroundServer(loop) as url:
        yield loop, url


def client(url: str, key: str = "none", asynchronous: bool = False):
    kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return kind(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@contextlib.contextmanager
def held(loop):
    """The decode thread waits (between two steps) until the block ends."""
    gate = threading.Event()
    loop.call(lambda: gate.wait(30))
    try:
        yield
    finally:
        gate.set()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def reference(served, task: str | None, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """(text, new token ids) of greedy generation of one prompt alone: a fresh model, the library's delta loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, paths = served
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if task is not None:
        model = deltatune.load_delta(model, paths[task])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        output = model.eval().generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=max_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = output[0, len(ids):]
    return tokenizer.decode(new, skip_special_tokens=True), new.tolist()


def plain_ids(served, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served[0])(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("settings", [{"packed_head": True}, {"packed_linears": True, "decode_loops": 2}],
                         ids=["packed head", "every linear packed, two decode loops"])
def test_concurrent_streams_of_every_method_decode_together_as_each_alone(served, settings):
    """Eight streamed completions over six deltas and the base model, queued while the decode threads are held,
    then decoded together: mixed steps happen, and every stream's text is the prompt's greedy text alone (the
    server's LM head, or every linear layer, prepacked for oneDNN where this torch has it, the reference's eager;
    one decode loop, or two on one model, each with its own rows)."""
    jobs = [(task, PROMPTS[i % len(PROMPTS)], 5 + 2 * i) for i, task in
            enumerate(["lora", "prompt", "base", "adapter", "prefix", "bitfit", "lora_wide", "lora"])]

    async def stream(api, task, prompt, max_tokens):
        pieces, finish = [], None
        async for chunk in await api.completions.create(model=task, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0, stream=True):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def scenario(loop, url):
        api = client(url, asynchronous=True)
        with held(loop):
            waiting = [asyncio.create_task(stream(api, *job)) for job in jobs]
            await asyncio.to_thread(wait_until, lambda: loop.metrics()["queue"] == len(jobs), "requests queued")
        return await asyncio.gather(*waiting)

    with server(served, max_batch_size=6, **settings) as (loop, url):
        results = asyncio.run(scenario(loop, url))
        metrics = loop.metrics()
        head = type(loop.model.base_model.get_output_embeddings()).__name__
        query = type(loop.model.base_model.model.layers[0].self_attn.q_proj.base_layer).__name__  # LoRA-wrapped
    assert head == ("PackedLinear" if prepacking_available() else "Linear")
    assert query == ("PackedLinear" if prepacking_available() and "packed_linears" in settings else "Linear")
    loops = settings.get("decode_loops", 1)
    assert metrics["decode_loops"] == loops and metrics["max_rows"] == 6 // loops  # each loop's batch was full
    assert metrics["mixed_steps"] > 0 and metrics["max_tasks_in_step"] >= 6 // loops - 1
    assert metrics["written_steps"] == metrics["steps"]  # the written-out Llama step (llama_step.py), every method
    for (task, prompt, max_tokens), (text, finish) in zip(jobs, results, strict=True):
        expected, tokens = reference(served, None if task == "base" else task, plain_ids(served, prompt), max_tokens)
        assert text == expected, task
        assert finish == ("length" if len(tokens) == max_tokens else "stop"), task


def test_chat_equals_deltatune_generate_and_usage_counts(served, capsys):
    """The chat route builds the prompt with the delta's own template, as `deltatune generate` does."""
    from deltatune.cli import main

    folder, paths = served
    assert main(["generate", "--model", str(folder), "--delta", str(paths["chat"]), "--max-new-tokens", "7",
                 PROMPTS[0]]) == 0
    streamed = capsys.readouterr().out
    with server(served) as (_, url):
        api = client(url)
        answer = api.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPTS[0]}],
                                             max_tokens=7, temperature=0)
        chunks = list(api.chat.completions.create(model="chat", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                  max_tokens=7, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        base = api.chat.completions.create(model="base", max_tokens=4, temperature=0,
                                           messages=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "hi"}])
        single = api.chat.completions.create(model="lora", max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}])
    text = answer.choices[0].message.content
    assert text.strip() == streamed.strip() and answer.choices[0].message.role == "assistant"
    chat_ids = plain_ids(served, f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert answer.usage.prompt_tokens == len(chat_ids)
    assert answer.usage.completion_tokens == len(reference(served, "chat", chat_ids, 7)[1])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # the stream: the role first, the same text, the finish, then one usage chunk without choices
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == answer.usage.model_dump()
    # the base model: the tokenizer's chat template over the whole conversation
    conversation = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert base.choices[0].message.content == reference(served, None, plain_ids(served, conversation), 4)[0]
    # a delta without a saved format (the built-in data-to-text task): its E2E prompt
    assert single.choices[0].message.content == reference(served, "lora", plain_ids(served, "hi\nSentence:"), 4)[0]


def test_chat_on_an_alpaca_delta_builds_its_training_prompt_as_predict_does(served, capsys):
    """A system + user message are Alpaca's instruction and input (the "### Input:" prompt the rows with an input
    trained on); one user message is the instruction of the no-input prompt. `deltatune predict` takes the same
    two fields as 'instruction ||| input' and answers the same."""
    from deltatune.cli import main

    folder, paths = served
    instruction, context = "Describe.", PROMPTS[0]
    assert main(["predict", "--model", str(folder), "--delta", str(paths["alpaca"]), "--max-new-tokens", "6",
                 f"{instruction} ||| {context}", instruction]) == 0
    predicted = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    trained = ALPACA_FORMAT  # what training made of a row with and without an input
    with_input = plain_ids(served, trained.format_row({"instruction": instruction, "input": context}))
    no_input = plain_ids(served, trained.format_row({"instruction": instruction}))
    assert "### Input:\nname[Aromi]" in trained.format_row({"instruction": instruction, "input": context})
    with server(served, tasks=("alpaca",)) as (_, url):
        api = client(url)
        both = api.chat.completions.create(model="alpaca", max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": instruction}, {"role": "user", "content": context}])
        alone = api.chat.completions.create(model="alpaca", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": instruction}])
        with pytest.raises(openai.BadRequestError, match="a system message .the instruction. then a user"):
            api.chat.completions.create(model="alpaca", messages=[{"role": "assistant", "content": "a"}])
    assert both.usage.prompt_tokens == len(with_input) and alone.usage.prompt_tokens == len(no_input)
    assert both.choices[0].message.content == reference(served, "alpaca", with_input, 6)[0] == predicted[0]
    assert alone.choices[0].message.content == reference(served, "alpaca", no_input, 6)[0] == predicted[1]


def test_bad_requests_are_400s_that_do_not_echo_them(served):
    """A NUL byte or a 100,000-character delta path, 10,000 stop strings, a body that is not JSON: 400s (were
    500s), whose message is short and readable."""
    folder, paths = served
    with server(served, tasks=("lora",), allow_loading=True, delta_root=str(paths["bitfit"].parent)) as (_, url):
        for path, problem in [("adapter\x00x", "contains a NUL byte"), ("a" * 100_000, "too long for the file system"),
                              ("x/" * 3000, "too long for the file system"), ("\ud800", "not valid text")]:
            body = json.dumps({"name": "x", "path": path})  # ASCII: a lone surrogate travels as JSON's \\ud800
            answer = httpx.post(url + "/v1/tasks", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400 and problem in answer.json()["detail"], path[:20]
            assert len(answer.text) < 400, path[:20]
        stops = [f"stop{i}" for i in range(10_000)]
        answer = httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "hi", "stop": stops})
        assert answer.status_code == 400 and len(answer.text) < 300
        assert "up to 4 non-empty strings, got 10,000 string(s)" in answer.json()["error"]["message"]
        broken = httpx.post(url + "/v1/completions", content=b'{"model": "lora", "prompt": "hi", "max_tokens": }',
                            headers={"content-type": "application/json"})
        assert broken.status_code == 400, broken.text
        error = broken.json()["error"]
        assert error["message"] == "the request body is not valid JSON: Expecting value at character 48"
        assert error["param"] is None and error["code"] == "invalid_json"


def scrape(url: str, **headers) -> dict[str, dict[tuple, float]]:
    """GET /metrics parsed by prometheus_client's own parser: {sample name: {sorted label pairs: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(url + "/metrics", headers=headers)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_in_prometheus_format_count_known_requests(served):
    """Two LoRA requests of 5 tokens and one prompt-tuning request of n=2 choices of 3 tokens (ignore_eos: the
    counts are known): requests, prompt and generated tokens per task, one first token per request, one inter-token
    gap per later token, decode steps whose rows sum to those later tokens; while the requests wait, vLLM's gauge
    names their adapters as waiting."""
    with server(served, tasks=("lora", "prompt"), max_batch_size=8) as (loop, url):
        api = client(url)
        calls = [("lora", 1, 5), ("lora", 1, 5), ("prompt", 2, 3)]
        answers = []
        threads = [threading.Thread(target=lambda task=task, n=n, tokens=tokens: answers.append(api.completions.create(
            model=task, prompt=PROMPTS[1], max_tokens=tokens, n=n, temperature=0, extra_body={"ignore_eos": True})))
            for task, n, tokens in calls]
        with held(loop):
            for thread in threads:
                thread.start()
            wait_until(lambda: loop.metrics()["queue"] == 3, "three requests queued")
            waiting = scrape(url)
        for thread in threads:
            thread.join(60)
        after = scrape(url)
    assert len(answers) == 3 and sum(a.usage.completion_tokens for a in answers) == 16
    info = waiting["vllm:lora_requests_info"]
    assert list(info) == [(("max_lora", "8"), ("running_lora_adapters", ""), ("waiting_lora_adapters", "lora,prompt"))]
    assert abs(next(iter(info.values())) - time.time()) < 60  # vLLM's value: when it was updated
    assert waiting["deltatune_queue_depth"][()] == 3 and after["deltatune_queue_depth"][()] == 0
    assert after["deltatune_running_requests"][()] == 0 and after["deltatune_loaded_deltas"][()] == 2
    assert after["deltatune_requests_total"] == {(("task", "lora"),): 2, (("task", "prompt"),): 1}
    prompt_tokens = len(plain_ids(served, PROMPTS[1]))
    assert after["deltatune_prompt_tokens_total"] == {(("task", "lora"),): 2 * prompt_tokens,
                                                      (("task", "prompt"),): prompt_tokens}
    assert after["deltatune_generation_tokens_total"] == {(("task", "lora"),): 10, (("task", "prompt"),): 6}
    assert after["deltatune_time_to_first_token_seconds_count"][()] == 3  # one per request, not per choice
    later_tokens = 16 - 4  # every token but each choice's first (which the prefill samples)
    assert after["deltatune_inter_token_latency_seconds_count"][()] == later_tokens
    assert after["deltatune_batch_size_sum"][()] == later_tokens  # a decode step's rows each make one token
    assert after["deltatune_batch_size_count"][()] == loop.metrics()["steps"]
    assert after["deltatune_time_to_first_token_seconds_bucket"][(("le", "+Inf"),)] == 3


def test_models_sampling_stop_and_n(served):
    with server(served, tasks=("lora", "prompt")) as (loop, url):
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["base", "lora", "prompt"]
        assert api.models.retrieve("prompt").id == "prompt"
        greedy = api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12, temperature=0)
        text = greedy.choices[0].text
        # top_p that keeps only the most likely token is greedy, whatever the temperature and seed
        narrow = api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12, temperature=1.5,
                                        top_p=1e-6, seed=3)
        assert narrow.choices[0].text == text
        # a seed gives the same tokens again; n choices differ from each other; a batch of prompts: n each
        sampled = [api.completions.create(model="lora", prompt=PROMPTS[1], max_tokens=12, seed=5, n=3).choices
                   for _ in range(2)]
        assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]
        assert [c.index for c in sampled[0]] == [0, 1, 2] and len({c.text for c in sampled[0]}) > 1
        several = api.completions.create(model="lora", prompt=PROMPTS[:2], max_tokens=3, temperature=0, n=2)
        assert [c.index for c in several.choices] == [0, 1, 2, 3]
        assert several.choices[0].text == several.choices[1].text != several.choices[2].text
        assert several.usage.prompt_tokens == len(plain_ids(served, PROMPTS[0])) + len(plain_ids(served, PROMPTS[1]))
        # a stop string ends the text before it, streamed or not
        stop = text[4:7]
        assert stop and text.find(stop) >= 4
        stopped = api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop])
        assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (text[: text.find(stop)], "stop")
        pieces = [c.choices[0].text for c in api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12,
                                                                    temperature=0, stop=stop, stream=True)]
        assert "".join(pieces) == text[: text.find(stop)]
        # an end-of-sequence token ends the choice: not in the text, counted in the usage
        _, tokens = reference(served, "prompt", plain_ids(served, PROMPTS[1]), 12)
        end = next(i for i in range(2, 12) if tokens[i] not in tokens[:i])
        loop.stop_ids = {tokens[end]}  # as if the model's EOS
        ended = api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12, temperature=0)
        assert (ended.choices[0].text, ended.choices[0].finish_reason) == (loop.tokenizer.decode(tokens[:end]), "stop")
        assert ended.usage.completion_tokens == end + 1
        going_on = api.completions.create(model="prompt", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})  # vLLM's extension
        assert going_on.choices[0].finish_reason == "length" and going_on.usage.completion_tokens == 12


def test_errors_in_openai_shape(served):
    with server(served, tasks=("lora",), max_tokens=20, max_n=2, max_prompt_tokens=30,
                max_body_bytes=4000) as (_, url):
        api = client(url)
        with pytest.raises(openai.NotFoundError) as missing:
            api.completions.create(model="nope", prompt="hi", max_tokens=2)
        assert missing.value.code == "model_not_found" and "'lora'" in missing.value.message
        assert missing.value.body["param"] == "model" and missing.value.body["type"] == "invalid_request_error"
        problems = [
            (openai.UnprocessableEntityError, {"temperature": 5}, "temperature"),
            (openai.UnprocessableEntityError, {"max_tokens": 0}, "max_tokens"),
            (openai.BadRequestError, {"max_tokens": 21}, "--max-tokens"),
            (openai.BadRequestError, {"n": 3}, "--max-n"),
            (openai.BadRequestError, {"stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
            (openai.BadRequestError, {"logprobs": 2}, "logprobs=2 is not supported"),
            (openai.BadRequestError, {"prompt": "word " * 40}, "--max-prompt-tokens"),
            (openai.BadRequestError, {"prompt": [5, 99999]}, "token ids must lie in"),
            (openai.APIStatusError, {"prompt": "x" * 5000}, "exceeds 4000 bytes"),
        ]
        for kind, change, message in problems:
            with pytest.raises(kind) as error:
                api.completions.create(**{"model": "lora", "prompt": "hi", "max_tokens": 2, **change})
            assert message in error.value.message, change
            assert set(error.value.body) >= {"message", "type", "param", "code"}, change
        assert error.value.status_code == 413
        with pytest.raises(openai.UnprocessableEntityError):
            api.chat.completions.create(model="lora", messages=[{"role": "robot", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="exactly one user message"):
            api.chat.completions.create(model="lora", messages=[{"role": "user", "content": "a"},
                                                                {"role": "assistant", "content": "b"}])
        assert api.completions.create(model="lora", prompt="hi", max_tokens=2).choices[0].text is not None


def test_api_key_on_every_route_but_health(served, monkeypatch):
    monkeypatch.setenv("DELTATUNE_API_KEY", "s3cret")
    with server(served, tasks=("lora",)) as (_, url):
        with pytest.raises(openai.AuthenticationError) as wrong:
            client(url, "guess").models.list()
        assert wrong.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "guess").completions.create(model="lora", prompt="hi", max_tokens=2)
        assert client(url, "s3cret").completions.create(model="lora", prompt="hi", max_tokens=2).choices
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/metrics", "/v1/tasks", "/docs", "/openapi.json"):
            assert httpx.get(url + path).status_code == 401, path
    monkeypatch.delenv("DELTATUNE_API_KEY")
    with server(served, tasks=("lora",)) as (_, url):  # no key configured: any key (or none) is accepted
        assert client(url, "anything").models.list().data
        assert httpx.get(url + "/v1/models").status_code == 200


def test_full_queue_429_and_a_cancelled_stream_frees_its_row(served):
    with server(served, tasks=("lora",), queue_size=1) as (loop, url):
        api = client(url)
        with held(loop):
            first = threading.Thread(target=lambda: api.completions.create(model="lora", prompt="hi", max_tokens=2))
            first.start()
            wait_until(lambda: loop.metrics()["queue"] == 1, "request queued")
            with pytest.raises(openai.RateLimitError) as full:
                api.completions.create(model="lora", prompt="hi", max_tokens=2)
        first.join()
        assert full.value.response.headers["retry-after"] == "1" and full.value.code == "queue_full"
        assert loop.metrics()["finished"] == 1 and loop.metrics()["rejected"] == 1
        # a client that gives up while its request waits: the request never takes a row
        with held(loop):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 50},
                           timeout=0.5)
            wait_until(lambda: loop._waiting[0].cancelled, "the server noticed the client leave")
        wait_until(lambda: loop.metrics()["cancelled"] == 1 and loop.metrics()["queue"] == 0, "request dropped")
        assert loop.metrics()["finished"] == 1 and loop.metrics()["tokens"] == 2

        lane = loop._lanes[0]  # the server's one decode loop
        step = lane.step
        lane.step = lambda *joining: (time.sleep(0.02), step(*joining))  # 100 tokens would take 2 s
        with httpx.Client(base_url=url, timeout=30) as http, http.stream(
                "POST", "/v1/completions", json={"model": "lora", "prompt": "hi", "max_tokens": 100,
                                                 "stream": True, "temperature": 0}) as response:
            chunk = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
        assert chunk["object"] == "text_completion"  # the client left after its first chunk
        wait_until(lambda: loop.metrics()["running"] == 0, "row freed")
        metrics = loop.metrics()
        assert metrics["cancelled"] == 2 and metrics["finished"] == 1 and metrics["tokens"] < 2 + 50
        assert api.completions.create(model="lora", prompt="hi", max_tokens=2).choices  # still serving


def test_loading_over_http_is_off_by_default_and_confined_to_the_delta_root(served, tmp_path):
    folder, paths = served
    with server(served, tasks=("lora",)) as (_, url):
        refused = httpx.post(url + "/v1/tasks", json={"name": "x", "path": str(paths["adapter"])})
        assert refused.status_code == 403 and "--allow-loading --delta-root" in refused.json()["detail"]
        assert httpx.delete(url + "/v1/tasks/lora").status_code == 403
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(paths["adapter"], root / "escape")  # a symlink leading out of the root
    with pytest.raises(DeltaTuneError, match="--allow-loading needs --delta-root"):
        ServeConfig(allow_loading=True)
    # two decode loops: a control call (load, remove) runs while the other loop waits between two passes
    with server(served, tasks=("lora",), allow_loading=True, delta_root=str(paths["bitfit"].parent),
                decode_loops=2) as (loop, url):
        api = client(url)
        for path, problem in [("../deltas/adapter", "contains '..'"), (str(paths["adapter"]) + "/../x", "'..'"),
                              ("/etc", "outside the delta root")]:
            answer = httpx.post(url + "/v1/tasks", json={"name": "x", "path": path})
            assert answer.status_code == 400 and problem in answer.json()["detail"], path
        loaded = httpx.post(url + "/v1/tasks", json={"name": "adapter2", "path": "adapter"})
        assert loaded.status_code == 201 and loaded.json()["method"] == "adapter"
        top = httpx.post(url + "/v1/tasks", json={"name": "top2", "path": "top"})
        assert top.status_code == 400 and "cannot decode in a batch" in top.json()["detail"]
        assert [m.id for m in api.models.list().data] == ["base", "lora", "adapter2"]
        text = api.completions.create(model="adapter2", prompt="hi", max_tokens=4, temperature=0).choices[0].text
        assert text == reference(served, "adapter", plain_ids(served, "hi"), 4)[0]
        # removed while one of its streams runs: the stream ends with an error event, then [DONE]
        for lane in loop._lanes:
            lane.step = functools.partial(lambda step, *joining: (time.sleep(0.02), step(*joining)), lane.step)
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "model": "adapter2", "prompt": "hi", "max_tokens": 100, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert httpx.delete(url + "/v1/tasks/adapter2").json() == {"deleted": "adapter2"}
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "was removed while this request ran" in json.loads(events[-2])["error"]["message"]
        assert loop.metrics()["running"] == 0 and "adapter2" not in loop.tasks
    with server(served, tasks=("lora",), allow_loading=True, delta_root=str(root)) as (_, url):
        escape = httpx.post(url + "/v1/tasks", json={"name": "x", "path": "escape"})
        assert escape.status_code == 400 and "outside the delta root" in escape.json()["detail"]


def test_delta_cache_evicts_the_least_recently_used_frees_it_and_reloads_it_on_request(served, tmp_path):
    """--max-loaded-deltas 3 with one pinned --delta: loading a third delta over vLLM's endpoint evicts the least
    recently used unpinned one (its tensors freed), a request for it loads it again (the same tokens as the delta
    alone), evicting the next; vLLM's answers for a name taken or unknown."""
    folder, paths = served
    root = tmp_path / "root"
    for name in ("d0", "d1", "d2"):
        shutil.copytree(paths["lora"], root / name)  # the lora delta under three names
    ids = plain_ids(served, PROMPTS[1])
    expected = reference(served, "lora", ids, 4)[0]
    with server(served, tasks=("adapter",), allow_loading=True, delta_root=str(root), max_loaded_deltas=3) as (
            loop, url):
        api = client(url)

        def load(name: str, **extra) -> httpx.Response:
            return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name, **extra})

        def complete(name: str) -> str:
            return api.completions.create(model=name, prompt=ids, max_tokens=4, temperature=0).choices[0].text

        assert load("d0").text == "Success: LoRA adapter 'd0' added successfully."
        assert load("d1").status_code == 200 and complete("d0") == expected  # d1 is now the least recently used
        freed = weakref.ref(next(iter(loop.model.task_parameters("d1").values())))
        assert load("d2").status_code == 200
        assert set(loop.tasks) == {"adapter", "d0", "d2"} and httpx.get(url + "/v1/tasks").json()["evicted"] == ["d1"]
        gc.collect()
        assert freed() is None  # the evicted delta's tensors are gone
        assert complete("d1") == expected  # loaded again from its folder; d0 (used before d2 was loaded) leaves
        assert set(loop.tasks) == {"adapter", "d1", "d2"} and loop.cache.evicted == {"d0": str(root / "d0")}
        assert (loop.metrics()["evicted"], loop.metrics()["reloaded"]) == (2, 1)
        assert scrape(url)["deltatune_loaded_deltas"][()] == 3
        taken = load("d2")
        assert taken.status_code == 400 and taken.json()["error"]["message"] == (
            "The lora adapter 'd2' has already been loaded.")
        assert load("d2", load_inplace=True).status_code == 200
        shutil.rmtree(root / "d0")
        os.symlink(paths["adapter"], root / "d0")  # the evicted delta's folder now leads out of the root
        with pytest.raises(openai.BadRequestError, match="outside the delta root"):
            complete("d0")
        unload = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "d0"})  # evicted: forgotten
        assert unload.text == "Success: LoRA adapter 'd0' removed successfully."
        with pytest.raises(openai.NotFoundError):
            complete("d0")
        missing = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "d0"})
        assert missing.status_code == 404 and missing.json()["error"]["message"] == (
            "The lora adapter 'd0' cannot be found.")
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "d1"}).status_code == 200
        assert set(loop.tasks) == {"adapter", "d2"}
    with pytest.raises(DeltaTuneError, match="--max-loaded-deltas 1 is fewer than the 2 deltas"):
        build_engine(str(folder), {"a": paths["lora"], "b": paths["adapter"]}, ServeConfig(max_loaded_deltas=1))


def test_top_layers_and_full_deltas_are_refused_at_start(served):
    for task in ("top", "full"):
        with pytest.raises(DeltaTuneError, match="cannot decode in a batch with other tasks"):
            server(served, tasks=(task,)).__enter__()


def test_serve_options_come_from_the_config_dataclass():
    from deltatune.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--model", "m", "--kind", "generation", "--max-tokens", "64",
                                      "--max-n", "2", "--allow-loading", "--delta-root", "/srv/deltas"])
    config = config_from_args(ServeConfig, args)
    assert (config.kind, config.max_tokens, config.max_n, config.allow_loading, config.delta_root) == \
        ("generation", 64, 2, True, "/srv/deltas")
    assert "s3cret" not in repr(ServeConfig(api_key="s3cret"))
    assert config.packed_linears and config.decode_loops == 0  # the command's defaults, not the library's
    args = build_parser().parse_args(["serve", "--model", "m", "--no-packed-linears"])
    assert not config_from_args(ServeConfig, args).packed_linears
