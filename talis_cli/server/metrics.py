"""Prometheus metrics of one server (prometheus-client, a registry of its own so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; time to first token spans a CPU prefill of a long prompt, per-token latency a fast GPU decode step
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


class ServerMetrics:
    """Counters by endpoint and status, tokens in and out, the scheduler's queue depth and batch size (read when
    scraped), and histograms of time to first token (one per request) and of the time between tokens (one per
    token)."""

    def __init__(self, scheduler_view):
        """scheduler_view: a callable returning the Scheduler (or None while the model loads)."""
        self.registry = CollectorRegistry()
        self.requests = Counter("talis_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("talis_prompt_tokens", "Prompt tokens of finished completions",
                                     registry=self.registry)
        self.completion_tokens = Counter("talis_completion_tokens", "Tokens generated (cancelled requests too)",
                                         registry=self.registry)
        queue = Gauge("talis_queue_depth", "Requests waiting for a batch row", registry=self.registry)
        running = Gauge("talis_running_requests", "Requests in the running batch (its size)", registry=self.registry)
        queue.set_function(lambda: getattr(scheduler_view(), "queue_depth", 0))
        running.set_function(lambda: getattr(scheduler_view(), "running", 0))
        self.time_to_first_token = Histogram("talis_time_to_first_token_seconds",
                                             "From a request's arrival to its first token", buckets=TTFT_BUCKETS,
                                             registry=self.registry)
        self.time_per_token = Histogram("talis_time_per_output_token_seconds",
                                        "Time between consecutive tokens of a request (inter-token latency), one "
                                        "observation per token after the first", buckets=TOKEN_BUCKETS,
                                        registry=self.registry)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def observe_completion(self, stats) -> None:
        """Record a finished or cancelled request's RequestStats."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.new_tokens)
        if stats.new_tokens:
            self.time_to_first_token.observe(stats.first_token_s)

    def observe_token_gap(self, seconds: float) -> None:
        """Record the time since the request's previous token (called from the scheduler thread)."""
        self.time_per_token.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
