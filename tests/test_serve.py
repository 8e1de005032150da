"""`deltatune serve` over real HTTP (httpx) on a free loopback port, with a tiny model folder and deltas.

To make batching deterministic, tests hold the worker thread (`engine.call(gate.wait)`) while requests
queue up, then release it: the queued requests must then run as one mixed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
import torch
from conftest import make_model

import deltatune
from deltatune.models import load_model, load_tokenizer
from deltatune.serving.app import ServeConfig, build_engine
from deltatune.testing import BackgroundServer

TEXTS = ["the movie was great .", "a bleak and weak plot", "funny"]


def randomise(model: deltatune.DeltaModel, task: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.2)


@pytest.fixture
def deltas(tiny_model_dir, tmp_path):
    """Two task deltas (LoRA, adapter) made on the tiny model folder, and one made for another model."""
    paths = {}
    configs = {"sst2": deltatune.LoRA(r=4), "rte": deltatune.Adapter(bottleneck=8)}
    for index, (task, config) in enumerate(configs.items()):
        model = deltatune.attach(load_model(str(tiny_model_dir)), config, task=task)
        randomise(model, task, seed=index)
        paths[task] = model.save_delta(tmp_path / task)
    foreign = deltatune.attach(make_model("gpt2"), deltatune.LoRA(r=2), task="foreign")
    paths["foreign"] = foreign.save_delta(tmp_path / "foreign")
    return paths


@contextlib.contextmanager
def running(tiny_model_dir, deltas, **settings):
    engine = build_engine(str(tiny_model_dir), {"sst2": deltas["sst2"], "rte": deltas["rte"]}, ServeConfig(**settings))
    with BackgroundServer(engine) as url:
        yield engine, url


@contextlib.contextmanager
def held(engine):
    """The worker thread waits (between batches) until the block ends."""
    gate = threading.Event()
    engine.call(lambda: gate.wait(30))
    try:
        yield
    finally:
        gate.set()


def wait_for_queue(engine, size: int) -> None:
    deadline = time.monotonic() + 10
    while engine.metrics()["queue"] < size:
        assert time.monotonic() < deadline, "requests did not reach the queue"
        time.sleep(0.005)


def expected_probabilities(tiny_model_dir, deltas, task: str, texts: list[str]) -> torch.Tensor:
    """Each text alone through the delta loaded with the library (no server), softmaxed."""
    model = deltatune.load_delta(load_model(str(tiny_model_dir)), deltas[task])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        return torch.stack([model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1) for text in texts])


def test_requests_for_two_tasks_run_as_one_mixed_batch(tiny_model_dir, deltas):
    async def scenario(engine, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with held(engine):
                first = asyncio.create_task(client.post("/v1/predict", json={"task": "sst2", "inputs": TEXTS}))
                second = asyncio.create_task(client.post("/v1/predict", json={"task": "rte", "inputs": TEXTS[:2]}))
                base = asyncio.create_task(client.post("/v1/predict", json={"task": "base", "inputs": TEXTS[2:]}))
                await asyncio.to_thread(wait_for_queue, engine, 3)
            return [await first, await second, await base], (await client.get("/stats")).json()

    with running(tiny_model_dir, deltas, max_wait_ms=50) as (engine, url):
        responses, metrics = asyncio.run(scenario(engine, url))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert metrics["batches"] == 1 and metrics["mixed_batches"] == 1 and metrics["max_tasks_in_batch"] == 3
    assert metrics["requests"] == 3 and metrics["inputs"] == 6
    for response, task, texts in zip(responses[:2], ["sst2", "rte"], [TEXTS, TEXTS[:2]]):
        body = response.json()
        assert body["task"] == task and [p["input"] for p in body["predictions"]] == texts
        got = torch.tensor([[p["probabilities"][k] for k in ("0", "1")] for p in body["predictions"]])
        torch.testing.assert_close(got, expected_probabilities(tiny_model_dir, deltas, task, texts), atol=1e-5, rtol=0)
        assert all(p["label"] == max(p["probabilities"], key=p["probabilities"].get) for p in body["predictions"])


def test_unknown_task_malformed_body_and_the_schema(tiny_model_dir, deltas):
    with running(tiny_model_dir, deltas, max_inputs=4) as (_, url), httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/v1/predict", json={"task": "mnli", "inputs": ["x"]})
        assert response.status_code == 404
        assert response.json()["tasks"] == ["rte", "sst2"] and "mnli" in response.json()["detail"]
        for body in [{"task": "sst2"}, {"task": "sst2", "inputs": []}, {"task": "sst2", "inputs": "text"},
                     {"task": "sst2", "inputs": [3]}, {"task": "sst2", "inputs": ["x"], "extra": 1},
                     {"task": "sst2", "inputs": ["x"] * 5}]:
            assert client.post("/v1/predict", json=body).status_code == 422, body
        assert client.post("/v1/predict", content=b"{not json").status_code == 422
        pair = client.post("/v1/predict", json={"task": "sst2", "inputs": [["a premise", "a hypothesis"]]})
        assert pair.status_code == 200 and pair.json()["predictions"][0]["input"] == ["a premise", "a hypothesis"]
        assert client.get("/health").json() == {"status": "ok", "tasks": ["rte", "sst2"], "queue": 0}
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{name}", "/health", "/metrics"} <= set(paths)


def test_loading_and_deleting_deltas_while_serving(tiny_model_dir, deltas, tmp_path):
    with running(tiny_model_dir, deltas, allow_loading=True, delta_root=str(tmp_path)) as (_, url), \
            httpx.Client(base_url=url, timeout=30) as client:
        missing = client.post("/v1/tasks", json={"name": "cola", "path": str(tmp_path / "nowhere")})
        assert missing.status_code == 400 and "nowhere" in missing.json()["detail"]
        foreign = client.post("/v1/tasks", json={"name": "cola", "path": str(deltas["foreign"])})
        assert foreign.status_code == 400 and "was made for base model" in foreign.json()["detail"]
        assert client.post("/v1/tasks", json={"name": "bad name!", "path": str(deltas["sst2"])}).status_code == 400
        assert client.post("/v1/tasks", json={"name": "rte", "path": str(deltas["sst2"])}).status_code == 409
        assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == ["sst2", "rte"]
        assert client.post("/v1/predict", json={"task": "sst2", "inputs": TEXTS}).status_code == 200  # still serving

        loaded = client.post("/v1/tasks", json={"name": "sst2_copy", "path": str(deltas["sst2"])})
        assert loaded.status_code == 201 and loaded.json()["method"] == "lora"
        same = [client.post("/v1/predict", json={"task": t, "inputs": TEXTS}).json()["predictions"]
                for t in ("sst2", "sst2_copy")]
        assert same[0] == same[1]

        assert client.delete("/v1/tasks/sst2").json() == {"deleted": "sst2"}
        gone = client.post("/v1/predict", json={"task": "sst2", "inputs": TEXTS})
        assert gone.status_code == 404 and gone.json()["tasks"] == ["rte", "sst2_copy"]
        assert client.delete("/v1/tasks/sst2").status_code == 404
        assert client.post("/v1/predict", json={"task": "sst2_copy", "inputs": TEXTS}).json()["predictions"] == same[1]


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir, deltas):
    async def scenario(engine, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with held(engine):
                waiting = [asyncio.create_task(client.post("/v1/predict", json={"task": t, "inputs": TEXTS}))
                           for t in ("sst2", "rte")]
                await asyncio.to_thread(wait_for_queue, engine, 2)
                rejected = await client.post("/v1/predict", json={"task": "sst2", "inputs": TEXTS})
            return rejected, [await w for w in waiting], (await client.get("/stats")).json()

    with running(tiny_model_dir, deltas, queue_size=2) as (engine, url):
        rejected, accepted, metrics = asyncio.run(scenario(engine, url))
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
    assert [r.status_code for r in accepted] == [200, 200]
    assert metrics["rejected"] == 1 and metrics["queue"] == 0


def test_a_closing_server_answers_503_not_429(tiny_model_dir, deltas):
    with running(tiny_model_dir, deltas) as (engine, url):
        engine.close()
        answer = httpx.post(f"{url}/v1/predict", json={"task": "sst2", "inputs": TEXTS}, timeout=30)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "shutting down" in answer.json()["detail"]


def test_every_response_base_rows_batch_splits_and_each_tasks_label_names(tiny_model_dir, tmp_path):
    """Nine inputs from four requests (two tasks with their own label names, the base model, a task again)
    queued together and run in passes of at most 2 (a request of 3 split over two passes): every input
    answered, in order, each as the library answers it alone (the base rows as the plain model), each task
    with its own label names."""
    labels = {"sst2": ["negative", "positive"], "rte": ["entailment", "not_entailment"]}
    paths = {}
    configs = {"sst2": deltatune.LoRA(r=4), "rte": deltatune.Adapter(bottleneck=8)}
    for index, (task, config) in enumerate(configs.items()):
        model = deltatune.attach(load_model(str(tiny_model_dir)), config, task=task, label_names=labels[task])
        randomise(model, task, seed=index)
        paths[task] = model.save_delta(tmp_path / task)
    requests = [("sst2", TEXTS), ("rte", TEXTS[:2]), ("base", TEXTS), ("sst2", TEXTS[1:2])]

    async def scenario(engine, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with held(engine):
                waiting = [asyncio.create_task(client.post("/v1/predict", json={"task": task, "inputs": texts}))
                           for task, texts in requests]
                await asyncio.to_thread(wait_for_queue, engine, len(requests))
            return [await w for w in waiting], (await client.get("/stats")).json()

    engine = build_engine(str(tiny_model_dir), paths, ServeConfig(max_batch_size=2, max_wait_ms=50))
    with BackgroundServer(engine) as url:
        responses, metrics = asyncio.run(scenario(engine, url))
    assert metrics["inputs"] == 9 and metrics["max_batch_inputs"] == 2 and metrics["batches"] >= 5

    plain = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for response, (task, texts) in zip(responses, requests, strict=True):
        assert response.status_code == 200, (task, response.text)
        body = response.json()
        assert body["task"] == task and [p["input"] for p in body["predictions"]] == texts
        if task == "base":
            with torch.no_grad():
                expected = torch.stack([plain(**tokenizer(t, return_tensors="pt")).logits[0].softmax(-1)
                                        for t in texts])
            names = sorted(body["predictions"][0]["probabilities"])
            assert names not in labels.values()
        else:
            expected, names = expected_probabilities(tiny_model_dir, paths, task, texts), labels[task]
        for prediction, row in zip(body["predictions"], expected, strict=True):
            assert list(prediction["probabilities"]) == names, task
            got = torch.tensor([prediction["probabilities"][name] for name in names])
            torch.testing.assert_close(got, row, atol=1e-5, rtol=0)
            assert prediction["label"] == names[int(row.argmax())]


def test_api_key_body_limit_and_loading_switch_guard_the_classification_routes(tiny_model_dir, deltas):
    with running(tiny_model_dir, deltas, api_key="k3y", max_body_bytes=300) as (_, url), \
            httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200  # the one open route
        body = {"task": "sst2", "inputs": TEXTS}
        assert client.post("/v1/predict", json=body).status_code == 401
        assert client.post("/v1/predict", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        key = {"Authorization": "Bearer k3y"}
        assert client.post("/v1/predict", json=body, headers=key).status_code == 200
        big = client.post("/v1/predict", json={"task": "sst2", "inputs": ["word " * 100]}, headers=key)
        assert big.status_code == 413 and "--max-body-bytes" in big.json()["detail"]
        chunked = client.post("/v1/predict", content=iter([b'{"task": "sst2", "inputs": ["', b"x" * 400, b'"]}']),
                              headers={**key, "Content-Type": "application/json"})  # no Content-Length
        assert chunked.status_code == 413
        refused = client.post("/v1/tasks", json={"name": "c", "path": str(deltas["sst2"])}, headers=key)
        assert refused.status_code == 403 and "--allow-loading" in refused.json()["detail"]
        # /docs opens in a browser: the key as the Basic password it asks for, on the documentation pages only
        challenge = client.get("/docs")
        assert challenge.status_code == 401 and challenge.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert client.get("/docs", auth=("me", "nope")).status_code == 401
        page = client.get("/docs", auth=("me", "k3y"))
        assert page.status_code == 200 and "swagger" in page.text.lower()
        schema = client.get("/openapi.json", auth=("", "k3y")).json()
        assert schema["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"  # /docs' Authorize button
        assert client.get("/openapi.json", headers=key).status_code == 200
        assert client.get("/v1/tasks", auth=("me", "k3y")).status_code == 401  # Basic nowhere else (CSRF)
        assert client.post("/v1/predict", json=body, auth=("me", "k3y")).status_code == 401
