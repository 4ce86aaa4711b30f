"""Prometheus text metrics of an ingress replica.

Every application counts requests by route and status, errors by type, and request latency (`Metrics`). The
encoder applications add tokens, the sizes of the model batches their requests ran in (dynamic batching made
visible) and the time requests waited in the model replica's batch queue (`BatchMetrics`); text generation adds
prompt and generated tokens, time to first token and the sequences the engine ran at once (`GenerationMetrics`).
"""

from __future__ import annotations

from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.total, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return lines


def counter(name: str, value) -> list[str]:
    return [f"# TYPE {name} counter", f"{name} {value}"]


class Metrics:
    """Requests by route and status, errors by type, latency; subclasses add their lines in `extra_lines`."""

    def __init__(self):
        self.requests: Counter = Counter()  # (route, status)
        self.errors: Counter = Counter()  # error type
        self.latency = Histogram(LATENCY_BUCKETS)

    def request(self, route: str, status: int, error: str | None, seconds: float) -> None:
        self.requests[(route, status)] += 1
        if error is not None:
            self.errors[error] += 1
        self.latency.observe(seconds)

    def extra_lines(self) -> list[str]:
        return []

    def render(self) -> str:
        lines = ["# TYPE pipelines_requests_total counter"]
        lines += [
            f'pipelines_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())
        ]
        lines += ["# TYPE pipelines_errors_total counter"]
        lines += [f'pipelines_errors_total{{type="{t}"}} {n}' for t, n in sorted(self.errors.items())]
        lines += self.latency.render("pipelines_request_seconds")
        return "\n".join(lines + self.extra_lines()) + "\n"


class BatchMetrics(Metrics):
    """Plus the tokens read, requests per model batch and the time queued for a batch."""

    def __init__(self):
        super().__init__()
        self.tokens = 0
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.queue = Histogram(LATENCY_BUCKETS)

    def batch(self, requests_in_batch: int, tokens: int, queued_s: float) -> None:
        self.batch_requests.observe(requests_in_batch)
        self.queue.observe(queued_s)
        self.tokens += tokens

    def extra_lines(self) -> list[str]:
        return (
            counter("pipelines_tokens_total", self.tokens)
            + self.batch_requests.render("pipelines_model_batch_requests")
            + self.queue.render("pipelines_model_queue_seconds")
        )


class GenerationMetrics(Metrics):
    """Plus prompt and generated tokens, time to first token and the number of sequences the engine ran at once
    while a request's tokens were made (its peak)."""

    def __init__(self):
        super().__init__()
        self.prompt_tokens = self.generated_tokens = 0
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.engine_sequences = Histogram(BATCH_BUCKETS)

    def extra_lines(self) -> list[str]:
        return (
            counter("pipelines_prompt_tokens_total", self.prompt_tokens)
            + counter("pipelines_generated_tokens_total", self.generated_tokens)
            + self.first_token.render("pipelines_time_to_first_token_seconds")
            + self.engine_sequences.render("pipelines_engine_sequences")
        )
