"""Prometheus metrics of one server, in a registry of its own (two apps in one process, as in
tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's counters, histograms and gauges; ``render()`` gives the /metrics text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("domaintune_requests", "HTTP requests by endpoint, model, status code and API key name",
                                ["endpoint", "model", "status", "key"], registry=self.registry)
        self.latency = Histogram("domaintune_request_seconds", "Time to the last byte of the response",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.prompt_tokens = Counter("domaintune_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter("domaintune_completion_tokens", "Tokens generated", ["model"],
                                         registry=self.registry)
        self.batch_rows = Histogram("domaintune_batch_rows", "Rows per batched generate", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.inflight = Gauge("domaintune_inflight_requests", "Requests being handled", registry=self.registry)
        self.models = Gauge("domaintune_models_served", "Model names being served", registry=self.registry)
        self.feedback = Counter("domaintune_feedback", "Feedback records stored", ["model"], registry=self.registry)
        self.reloads = Counter("domaintune_registry_reloads", "Models loaded or unloaded by following the registry",
                               ["action"], registry=self.registry)
        self.registry_errors = Counter("domaintune_registry_poll_errors", "Polls of the registry that failed",
                                       registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
