"""`GET /metrics` of `deltatune serve`: Prometheus' text format, through `prometheus_client`.

Each engine (`ModelWorker`) owns one `ServerMetrics`, with a registry of its own (two servers in one process, as in
the tests, count apart). The worker thread counts as it works (requests, tokens, batch sizes, latencies); what the
server holds now (queue depth, running requests, loaded deltas and vLLM's adapter gauge) is read when scraped.

    deltatune_requests_total{task}                 requests accepted, per task ("base": no delta)
    deltatune_prompt_tokens_total{task}            generation: prompt tokens of those requests
    deltatune_generation_tokens_total{task}        generation: tokens generated (every choice)
    deltatune_inputs_total{task}                   classification: inputs predicted
    deltatune_batch_size                           histogram: rows in one forward pass (a decode step, a batch)
    deltatune_time_to_first_token_seconds          histogram: from arrival to a request's first token
    deltatune_inter_token_latency_seconds          histogram: between two tokens of one choice
    deltatune_queue_depth, deltatune_running_requests, deltatune_loaded_deltas, deltatune_max_loaded_deltas
    vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}

`vllm:lora_requests_info` is the gauge gateways that route by adapter read from vLLM (the Gateway API Inference
Extension's model-server protocol): its value is the time it was updated (Unix seconds), its labels the adapters of
the running and of the waiting requests (comma-separated names) and `max_lora`, the most adapters the server holds
at once: --max-loaded-deltas, or, unbounded, --max-batch-size (every row of a decode step may be another delta).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# seconds; vLLM's buckets (vllm/v1/metrics/loggers.py: time_to_first_token_seconds to 80 s,
# time_per_output_token_seconds, here extended to 10 s), so dashboards made for vLLM read these alike
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Now:
    """A collector of what the server holds at the moment of the scrape (`state()`: the engine's `load_state`)."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self.state = state

    def describe(self) -> Iterable:
        return []  # nothing known before the first scrape; the registry then asks `collect`

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self.state()
        for name, text in [("queue_depth", "requests waiting to be admitted"),
                           ("running_requests", "requests being prefilled or decoded (a batch being run)"),
                           ("loaded_deltas", "task deltas loaded"),
                           ("max_loaded_deltas", "--max-loaded-deltas (0: unbounded)")]:
            yield GaugeMetricFamily(f"deltatune_{name}", text, value=state[name])
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(state["max_lora"]), ",".join(sorted(set(state["running_tasks"]))),
                         ",".join(sorted(set(state["waiting_tasks"])))], time.time())
        yield info


class ServerMetrics:
    """The counters and histograms of one server, and its text for `GET /metrics` (`render`)."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        per_task = {"labelnames": ["task"], "registry": self.registry}
        self.requests = Counter("deltatune_requests", "requests accepted, per task", **per_task)
        self.prompt_tokens = Counter("deltatune_prompt_tokens", "prompt tokens of the requests accepted", **per_task)
        self.generation_tokens = Counter("deltatune_generation_tokens", "tokens generated", **per_task)
        self.inputs = Counter("deltatune_inputs", "classification inputs predicted", **per_task)
        self.batch_size = Histogram("deltatune_batch_size", "rows in one forward pass (a decode step or a batch)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "deltatune_time_to_first_token_seconds", "from a request's arrival to its first token",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("deltatune_inter_token_latency_seconds", "between two tokens of one choice",
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_Now(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
