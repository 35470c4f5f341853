"""Dynamic batching and metrics of `ltp-compress serve` (no web framework here; pipeline/serve.py
wires them to HTTP).

`Batcher`: requests (each a list of (text_a, text_b)) wait in one bounded queue (counted in texts);
one worker thread takes the oldest request, waits up to `max_wait_s` for more until `max_batch_size`
texts are there, runs them as length buckets (sorted by length, a bucket cut at max_batch_size texts
or where the longest text is more than `bucket_ratio` times the current one) in one call of the
runtime (`logits_many`: with onnxruntime streams the buckets run at once), and completes each
request's future. A full queue refuses with `QueueFull` (HTTP 503 + Retry-After) instead of growing;
after `close` starts nothing new is accepted (`ShuttingDown`), and what was accepted is run first
(drained). Every accepted request's future is completed exactly once: with its results, with the
runtime's exception, or with `ShuttingDown` if the drain ran out of time.

`Metrics`: counters and histograms rendered in the Prometheus text exposition format 0.0.4."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    def __init__(self, queued: int, max_queue: int, retry_after_s: int):
        super().__init__(f"queue full ({queued} of {max_queue} texts waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    pass


@dataclass
class _Job:
    pairs: list
    future: Future
    enqueued: float = field(default_factory=time.monotonic)


def length_buckets(lengths: list[int], max_batch_size: int, bucket_ratio: float) -> list[list[int]]:
    """Indices sorted by length (longest first), cut at max_batch_size or where the bucket's longest
    is more than bucket_ratio times the next one (less padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and len(buckets[-1]) < max_batch_size and lengths[buckets[-1][0]] <= bucket_ratio * max(lengths[i], 1):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


class Batcher:
    """`run(pairs, buckets) -> results` (one per pair, in order) runs on the worker thread only."""

    def __init__(self, run, *, max_batch_size: int, max_wait_s: float, max_queue: int, bucket_ratio: float, metrics: "Metrics"):
        self._run = run
        self.max_batch_size, self.max_wait_s, self.max_queue, self.bucket_ratio = max_batch_size, max_wait_s, max_queue, bucket_ratio
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # texts in self._jobs
        self._accepting = True
        self._cond = threading.Condition()
        self._seconds_per_text = 0.01  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="ltp-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, pairs: list) -> Future:
        fut: Future = Future()
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._queued + len(pairs) > self.max_queue:
                retry = max(1, int(round(self._queued * self._seconds_per_text + 0.5)))
                raise QueueFull(self._queued, self.max_queue, retry)
            self._jobs.append(_Job(list(pairs), fut))
            self._queued += len(pairs)
            self._cond.notify_all()
        return fut

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs:
                if not self._accepting:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].enqueued + self.max_wait_s
            while self._accepting and self._queued < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken, n = [], 0
            while self._jobs and (not taken or n + len(self._jobs[0].pairs) <= self.max_batch_size):
                job = self._jobs.popleft()
                taken.append(job)
                n += len(job.pairs)
            self._queued -= n
            return taken

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            pairs = [p for j in jobs for p in j.pairs]
            t0 = time.monotonic()
            try:
                lengths = [len(a) + len(b or "") for a, b in pairs]
                buckets = length_buckets(lengths, self.max_batch_size, self.bucket_ratio)
                results = self._run(pairs, buckets)
                for b in buckets:
                    self.metrics.batch_size.observe(len(b))
            except Exception as e:  # the runtime failed: every request of this batch gets the error, the server goes on
                for j in jobs:
                    j.future.set_exception(e)
                continue
            self._seconds_per_text = 0.8 * self._seconds_per_text + 0.2 * (time.monotonic() - t0) / max(1, len(pairs))
            self.metrics.record_results(results)
            s = 0
            for j in jobs:
                j.future.set_result(results[s:s + len(j.pairs)])
                s += len(j.pairs)

    def close(self, timeout_s: float) -> int:
        """Stop accepting, run what was accepted (up to timeout_s), fail what is left; returns how
        many requests were failed that way."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        self._thread.join(timeout_s)
        failed = 0
        with self._cond:
            while self._jobs:
                job = self._jobs.popleft()
                self._queued -= len(job.pairs)
                job.future.set_exception(ShuttingDown("the server shut down before this request ran"))
                failed += 1
        return failed


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1
            self.sum += v
            self.count += 1

    def render(self) -> list[str]:
        with self._lock:
            out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            out += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """Everything /metrics reports; `queue_depth` is read from the batcher when rendering."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # HTTP status -> responses
        self.latency = Histogram("ltp_request_latency_seconds", "POST /predict latency (accepted to answered)",
                                 (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.batch_size = Histogram("ltp_batch_size", "texts per batch run on the runtime (one length bucket)",
                                    (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.texts = 0
        self.truncated = 0
        self.tokens_input = 0
        self.tokens_kept: list[int] = []  # per layer: tokens entering it, summed over texts

    def record_response(self, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[status] += 1
        if seconds is not None:
            self.latency.observe(seconds)

    def record_results(self, results: list[dict]) -> None:
        with self._lock:
            for r in results:
                self.texts += 1
                self.tokens_input += int(r.get("tokens") or 0)
                self.truncated += r.get("truncation") is not None
                for layer, k in enumerate(r.get("kept_tokens") or []):
                    if layer >= len(self.tokens_kept):
                        self.tokens_kept.append(0)
                    self.tokens_kept[layer] += int(k)

    def render(self, queue_depth: int) -> str:
        with self._lock:
            out = ["# HELP ltp_requests_total POST /predict responses by HTTP status", "# TYPE ltp_requests_total counter"]
            out += [f'ltp_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            out += ["# HELP ltp_queue_depth texts waiting for the model", "# TYPE ltp_queue_depth gauge", f"ltp_queue_depth {queue_depth}",
                    "# HELP ltp_texts_total texts classified", "# TYPE ltp_texts_total counter", f"ltp_texts_total {self.texts}",
                    "# HELP ltp_truncated_texts_total texts longer than max_seq_length (truncated)", "# TYPE ltp_truncated_texts_total counter",
                    f"ltp_truncated_texts_total {self.truncated}",
                    "# HELP ltp_tokens_input_total tokens the model read (after truncation, special tokens included)",
                    "# TYPE ltp_tokens_input_total counter", f"ltp_tokens_input_total {self.tokens_input}",
                    "# HELP ltp_tokens_kept_total tokens entering each encoder layer after pruning, summed over texts",
                    "# TYPE ltp_tokens_kept_total counter"]
            out += [f'ltp_tokens_kept_total{{layer="{l}"}} {k}' for l, k in enumerate(self.tokens_kept)]
        return "\n".join(out + self.latency.render() + self.batch_size.render()) + "\n"
