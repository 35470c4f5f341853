"""`ltp-compress serve` (pipeline/serve.py, serve_batcher.py, serve_args.py) against a real uvicorn
server on 127.0.0.1 (a free port), with a tiny pruned INT8 BERT exported to ONNX inside a fake run
folder (so the task, and with it single sentence vs pair, is known). Fault tests wrap the model so a
batch blocks on an event or raises: what the server does then is decided by the test, not by timing.
Every request loop is bounded; no wall-clock assertions."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import ltp_compress
from ltp_compress.modeling.pruned_encoder import PruningConfig
from ltp_compress.pipeline.serve import build_app, bind, model_card, uvicorn_server
from ltp_compress.pipeline.serve_args import ServeSettings
from ltp_compress.pipeline.serve_batcher import Batcher, Metrics, QueueFull, ShuttingDown, length_buckets

from conftest import DEMO_DATA

COST = {"relative_flops": 0.5, "flops_executed": 123.0, "bops": 456.0}


def build_served_models(tiny_bert: Path, root: Path) -> dict[str, Path]:
    """{"sst2": export, "mrpc": export, "sst2_ckpt": checkpoint}: the same tiny INT8 model in two fake
    runs (task sst2: single sentences; mrpc: pairs), each stage folder with a meta.json cost."""
    from test_onnx_export import _Quantised

    from ltp_compress.modeling.onnx_export import export_onnx

    q = _Quantised(tiny_bert)
    out = {}
    for task in ("sst2", "mrpc"):
        run = root / f"{task}_run"
        stage = run / "stages" / "01-int8"
        stage.mkdir(parents=True)
        (run / "recipe.json").write_text(json.dumps({"task": task}))
        (stage / "meta.json").write_text(json.dumps({"cost": COST}))
        ckpt = q.checkpoint(PruningConfig(mode="threshold", thresholds=[1.0, 1.0]), stage / "model")
        out[task] = export_onnx(ckpt, root / f"{task}_onnx")
        out[f"{task}_ckpt"] = ckpt
    return out


@pytest.fixture(scope="module")
def served(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    return build_served_models(tiny_bert, tmp_path_factory.mktemp("serve"))


def _dev_texts(n: int) -> list[str]:
    return [l.split("\t")[0] for l in (DEMO_DATA / "dev.tsv").read_text().splitlines()[1:1 + n]]


class Gate:
    """Wraps a loaded model: `logits_many` waits for `release` (when armed) and raises on a text
    containing FAIL, so a test decides when a batch runs and which one fails."""

    FAIL = "zzfailzz"

    def __init__(self, model):
        self._m = model
        self.armed = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self._m, name)

    def encode(self, a, b=None):
        if any(self.FAIL in t for t in a):
            raise RuntimeError("injected runtime failure")
        return self._m.encode(a, b)

    def logits_many(self, batches):
        self.entered.set()
        if self.armed.is_set():
            assert self.release.wait(60), "test never released the gate"
        self.batches += [len(np.asarray(b["input_ids"])) for b in batches]
        out = self._m.logits_many(batches)
        self.last_kept_tokens = self._m.last_kept_tokens
        return out


@contextmanager
def running(model, path: Path, expects_pair: bool | None = False, task: str | None = "sst2", **options):
    """A uvicorn server on 127.0.0.1 (free port) in a thread; yields (port, server, app); stops it at the end."""
    settings = ServeSettings(port=0, **options)
    app = build_app(model, settings, model_card(model, path, task, expects_pair), expects_pair)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn_server(app, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):  # bounded: up to ~10 s for startup
        if server.started:
            break
        time.sleep(0.02)
    assert server.started
    try:
        yield port, server, app
    finally:
        if isinstance(model, Gate):
            model.release.set()
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def request(port: int, method: str, path: str, body: bytes | dict | None = None, timeout: float = 30) -> tuple[int, dict, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        r = conn.getresponse()
        raw = r.read().decode()
        ctype = r.getheader("content-type", "")
        return r.status, dict(r.getheaders()), json.loads(raw) if "json" in ctype else raw
    finally:
        conn.close()


def metric(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


# ----------------------------------------------------------------------------- happy path


def test_predict_forms_health_metrics_and_card(served):
    export = served["sst2"]
    model = ltp_compress.load(export, threads=1)
    texts = _dev_texts(5)
    expect = model.predict(texts)
    manifest = json.loads((export / "manifest.json").read_text())
    with running(model, export) as (port, _, _):
        s, _, one = request(port, "POST", "/predict", {"text": texts[0]})
        assert s == 200 and one["results"][0]["label"] == expect[0]["label"]
        assert one["results"][0]["score"] == pytest.approx(expect[0]["score"], abs=1e-6)
        r = one["results"][0]
        assert r["truncation"] is None and r["tokens"] >= 3 and len(r["kept_tokens"]) == 2 and r["kept_tokens"][0] == r["tokens"]
        s, _, many = request(port, "POST", "/predict", {"texts": texts})
        assert s == 200 and [x["label"] for x in many["results"]] == [e["label"] for e in expect]
        assert request(port, "GET", "/health")[0] == 200
        s, _, card = request(port, "GET", "/model")
        assert s == 200 and card["task"] == "sst2" and card["input"] == "single sentence" and card["runtime"] == "onnxruntime"
        assert card["cost"]["relative_flops"] == COST["relative_flops"] and card["labels"] == {"0": "LABEL_0", "1": "LABEL_1"}
        assert card["weights_sha256"]["model.onnx"] == manifest["files"]["model.onnx"]["sha256"]
        assert card["kernels"]["int8_op"] == "MatMulIntegerToFloat"
        s, headers, text = request(port, "GET", "/metrics")
        assert s == 200 and headers["content-type"].startswith("text/plain")
        assert metric(text, 'ltp_requests_total{status="200"}') == 2 and metric(text, "ltp_texts_total") == 6
        assert metric(text, "ltp_batch_size_count") >= 2 and metric(text, "ltp_request_latency_seconds_count") == 2
        assert metric(text, 'ltp_tokens_kept_total{layer="0"}') == metric(text, "ltp_tokens_input_total") > 0
        assert 0 < metric(text, 'ltp_tokens_kept_total{layer="1"}') <= metric(text, 'ltp_tokens_kept_total{layer="0"}')
        assert "ltp_queue_depth 0" in text


def test_pair_model_takes_pairs_and_refuses_single_texts(served):
    export = served["mrpc"]
    model = ltp_compress.load(export, threads=1)
    with running(model, export, expects_pair=True, task="mrpc") as (port, _, _):
        s, _, out = request(port, "POST", "/predict", {"text": "a good movie", "text_pair": "really good"})
        assert s == 200 and out["results"][0]["label"] == model.predict(["a good movie"], ["really good"])[0]["label"]
        s, _, out = request(port, "POST", "/predict", {"texts": [{"text": "a", "text_pair": "b"}, "just one"]})
        assert s == 400 and "texts[1]" in out["error"] and "sentence pairs" in out["error"]


def test_torch_checkpoint_served_too(served):
    ckpt = served["sst2_ckpt"]
    model = ltp_compress.load(ckpt, runtime="torch")
    with running(model, ckpt) as (port, _, _):
        s, _, out = request(port, "POST", "/predict", {"texts": _dev_texts(3)})
        assert s == 200 and [r["label"] for r in out["results"]] == [r["label"] for r in model.predict(_dev_texts(3))]
        s, _, card = request(port, "GET", "/model")
        assert card["runtime"] == "torch" and card["cost"]["bops"] == COST["bops"] and sum(card["kernels"].values()) > 0
        assert card["weights_sha256"]["model.safetensors"] == json.loads((ckpt / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]


# ----------------------------------------------------------------------------- bad input


BAD_BODIES = [
    (b'{"text": "unterminated', 400, "not valid JSON"),
    (b'{"text": "caf\xff"}', 400, "not valid UTF-8"),
    (b'{"text": 5}', 400, "text"),
    (b'{"texts": "not a list"}', 400, "texts"),
    (b'{"text": "ok", "colour": "red"}', 400, "colour"),
    (b'{"text": "ok", "texts": ["x"]}', 400, "exactly one"),
    (b'{"texts": []}', 400, "empty"),
    (b'[1, 2]', 400, "body"),
    (b'{"text": "   "}', 400, "text: empty text"),
    (b'{"texts": ["fine", ""]}', 400, "texts[1]: empty text"),
    (b'{"text": "a", "text_pair": "b"}', 400, "single sentences"),
    (json.dumps({"texts": ["x"] * 9}).encode(), 400, "max_texts_per_request 8"),
    (json.dumps({"text": "y" * 101}).encode(), 400, "max_text_chars 100"),
    (json.dumps({"text": "y" * 3000}).encode(), 413, "max_request_bytes"),
]


def test_bad_requests_get_a_clear_answer_and_the_server_goes_on(served):
    export = served["sst2"]
    model = Gate(ltp_compress.load(export, threads=1))
    with running(model, export, max_texts_per_request=8, max_text_chars=100, max_request_bytes=2000) as (port, _, _):
        for body, status, words in BAD_BODIES:
            s, _, out = request(port, "POST", "/predict", body)
            assert (s, words in out.get("error", "")) == (status, True), (body[:60], s, out)
        assert model.batches == []  # nothing reached the model
        s, _, out = request(port, "POST", "/predict", {"texts": ["a gripping film"]})
        assert s == 200
        text = request(port, "GET", "/metrics")[2]
        assert metric(text, 'ltp_requests_total{status="400"}') == sum(1 for _, st, _ in BAD_BODIES if st == 400)
        assert metric(text, 'ltp_requests_total{status="413"}') == 1


def test_truncation_is_reported(served):
    export = served["sst2"]
    model = ltp_compress.load(export, threads=1)
    long = " ".join(["the film is good"] * 60)
    with running(model, export) as (port, _, _):
        s, _, out = request(port, "POST", "/predict", {"texts": [long, "short one"]})
    assert s == 200
    tr = out["results"][0]["truncation"]
    assert tr == {"tokens_before_truncation": 242, "max_seq_length": 128} and out["results"][0]["tokens"] == 128
    assert out["results"][1]["truncation"] is None


# ----------------------------------------------------------------------------- batching and faults


def test_batcher_groups_queued_requests_and_refuses_beyond_the_queue():
    release = threading.Event()
    seen: list[list[int]] = []

    def run(pairs, buckets):
        release.wait(30)
        seen.append([len(b) for b in buckets])
        return [{"label": a} for a, _ in pairs]

    b = Batcher(run, max_batch_size=4, max_wait_s=0.0, max_queue=6, bucket_ratio=2.0, metrics=Metrics())
    first = b.submit([("first", None)])
    for _ in range(200):  # bounded: the worker takes the first job
        if b.queue_depth == 0:
            break
        time.sleep(0.01)
    queued = [b.submit([(f"t{i}", None)]) for i in range(6)]  # the worker is blocked in run(): these wait
    with pytest.raises(QueueFull) as e:
        b.submit([("one too many", None)])
    assert e.value.retry_after_s >= 1
    release.set()
    assert first.result(30) == [{"label": "first"}]
    assert [f.result(30) for f in queued] == [[{"label": f"t{i}"}] for i in range(6)]
    assert seen[0] == [1] and sorted(sum(seen[1:], [])) == [2, 4]  # queued requests ran as batches of up to 4
    assert b.close(5) == 0
    with pytest.raises(ShuttingDown):
        b.submit([("late", None)])


def _blocked_batcher(max_queue: int = 8):
    release = threading.Event()

    def run(pairs, buckets):
        assert release.wait(30)
        return [{"label": a} for a, _ in pairs]

    b = Batcher(run, max_batch_size=1, max_wait_s=0.0, max_queue=max_queue, bucket_ratio=2.0, metrics=Metrics())
    first = b.submit([("first", None)])
    for _ in range(200):  # bounded: the worker has taken the first job and is blocked in run()
        if b.queue_depth == 0:
            break
        time.sleep(0.01)
    return b, release, first


def test_batcher_close_drains_what_was_accepted():
    b, release, first = _blocked_batcher()
    queued = [b.submit([(f"t{i}", None)]) for i in range(3)]
    closer = threading.Thread(target=b.close, args=(30,))
    closer.start()
    for _ in range(200):  # bounded: close() has stopped new work
        if not b.accepting:
            break
        time.sleep(0.01)
    with pytest.raises(ShuttingDown):
        b.submit([("after close", None)])
    release.set()
    closer.join(30)
    assert first.result(5) == [{"label": "first"}] and [f.result(5) for f in queued] == [[{"label": f"t{i}"}] for i in range(3)]


def test_batcher_close_answers_what_it_could_not_run():
    b, release, first = _blocked_batcher()
    queued = [b.submit([(f"t{i}", None)]) for i in range(2)]
    assert b.close(0.05) == 2  # the drain ran out of time: both queued requests are answered with ShuttingDown
    for f in queued:
        with pytest.raises(ShuttingDown):
            f.result(5)
    release.set()
    assert first.result(30) == [{"label": "first"}]


def test_length_buckets_cut_by_size_and_length():
    assert length_buckets([10, 10, 10, 10, 10], 2, 2.0) == [[0, 1], [2, 3], [4]]
    assert length_buckets([100, 10, 40, 90], 8, 2.0) == [[0, 3], [2], [1]]


def test_burst_beyond_the_queue_gets_503_and_every_accepted_request_is_answered(served):
    export = served["sst2"]
    model = Gate(ltp_compress.load(export, threads=1))
    model.armed.set()
    n = 12
    statuses: list[tuple[int, str | None, dict]] = [None] * n  # type: ignore[list-item]

    def client(i):
        s, h, out = request(model_port, "POST", "/predict", {"text": f"burst text {i}"})
        statuses[i] = (s, h.get("retry-after"), out)

    with running(model, export, max_queue=4, max_texts_per_request=4, max_batch_size=2, max_wait_ms=0) as (model_port, _, _):
        s0 = threading.Thread(target=client, args=(0,))
        s0.start()
        assert model.entered.wait(30)  # request 0 is in the (blocked) runtime
        threads = [threading.Thread(target=client, args=(i,)) for i in range(1, n)]
        for t in threads:
            t.start()
        for _ in range(500):  # bounded: until every burst request was answered 503 or queued
            text = request(model_port, "GET", "/metrics")[2]
            if metric(text, 'ltp_requests_total{status="503"}') + metric(text, "ltp_queue_depth") == n - 1:
                break
            time.sleep(0.02)
        model.release.set()
        for t in [s0] + threads:
            t.join(60)
        text = request(model_port, "GET", "/metrics")[2]
    codes = [s for s, _, _ in statuses]
    assert codes.count(200) == 5 and codes.count(503) == n - 5  # 1 running + 4 queued, the rest refused
    assert all(ra is not None and int(ra) >= 1 for s, ra, _ in statuses if s == 503)
    answered = sorted(int(out["results"][0]["label"] is not None) for s, _, out in statuses if s == 200)
    assert answered == [1] * 5 and metric(text, 'ltp_requests_total{status="200"}') == 5


def test_runtime_failure_answers_500_and_the_server_goes_on(served):
    export = served["sst2"]
    model = Gate(ltp_compress.load(export, threads=1))
    with running(model, export) as (port, _, _):
        s, _, out = request(port, "POST", "/predict", {"text": f"a {Gate.FAIL} text"})
        assert s == 500 and "injected runtime failure" in out["error"]
        assert request(port, "POST", "/predict", {"text": "a fine film"})[0] == 200


def test_client_disconnecting_mid_request_does_not_hurt_the_server(served):
    export = served["sst2"]
    model = Gate(ltp_compress.load(export, threads=1))
    model.armed.set()
    with running(model, export) as (port, _, _):
        body = json.dumps({"text": "i leave before the answer"}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert model.entered.wait(30)
        sock.close()  # gone while its batch runs
        model.release.set()
        for _ in range(500):  # bounded: the abandoned request is finished by the server
            if metric(request(port, "GET", "/metrics")[2], "ltp_texts_total") == 1:
                break
            time.sleep(0.02)
        s, _, out = request(port, "POST", "/predict", {"text": "still here"})
        assert s == 200 and metric(request(port, "GET", "/metrics")[2], "ltp_texts_total") == 2


def test_shutdown_drains_accepted_requests_and_refuses_new_ones(served):
    export = served["sst2"]
    model = Gate(ltp_compress.load(export, threads=1))
    model.armed.set()
    results: dict[int, int] = {}

    def client(i):
        results[i] = request(port, "POST", "/predict", {"text": f"accepted before shutdown {i}"})[0]

    with running(model, export, max_batch_size=1) as (port, server, app):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert model.entered.wait(30)
        for _ in range(500):  # bounded: all three accepted (one running, two queued)
            if app.state.batcher.queue_depth == 2:
                break
            time.sleep(0.02)
        server.should_exit = True  # shutdown starts while three requests are accepted and unanswered
        for _ in range(500):  # bounded: uvicorn has closed its listening socket
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.02)
        with pytest.raises(OSError):  # a request during shutdown: refused, not queued
            request(port, "POST", "/predict", {"text": "too late"}, timeout=5)
        model.release.set()
        for t in threads:
            t.join(60)
    assert results == {0: 200, 1: 200, 2: 200}
    assert not app.state.batcher.accepting


def test_mixed_good_and_bad_requests_each_get_exactly_one_answer(served):
    export = served["sst2"]
    model = ltp_compress.load(export, threads=1)
    n, workers = 240, 8
    answers: dict[int, list] = {i: [] for i in range(n)}
    bodies = []
    for i in range(n):
        kind = i % 4
        bodies.append({"text": f"good number {i}"} if kind == 0 else {"texts": [f"list {i}", "b"]} if kind == 1
                      else b'{"text": ' if kind == 2 else {"text": ""})

    def worker(w):
        for i in range(w, n, workers):
            s, _, out = request(port, "POST", "/predict", bodies[i])
            answers[i].append((s, out))

    with running(model, export, max_batch_size=8, max_wait_ms=2) as (port, _, _):
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        text = request(port, "GET", "/metrics")[2]
    assert all(len(a) == 1 for a in answers.values())
    assert [a[0][0] for a in answers.values()] == [200 if i % 4 < 2 else 400 for i in range(n)]
    assert all(len(a[0][1]["results"]) == (1 if i % 4 == 0 else 2) for i, a in answers.items() if i % 4 < 2)
    assert metric(text, 'ltp_requests_total{status="200"}') == n // 2 and metric(text, "ltp_texts_total") == 3 * n // 4


# ----------------------------------------------------------------------------- CLI


def test_serve_cli_refuses_bad_settings_and_folders(served, tmp_path, capsys):
    from ltp_compress.pipeline.cli import main

    assert main(["serve", str(served["sst2"]), "--max-queue", "2", "--max-texts-per-request", "4"]) == 2
    assert "max_texts_per_request (4) must be <= max_queue (2)" in capsys.readouterr().err
    assert main(["serve", str(served["sst2"]), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["serve", str(served["sst2"]), "--task", "nonsense"]) == 2
    assert "task 'nonsense'" in capsys.readouterr().err


def test_listening_socket_is_tcp_so_responses_are_not_held_back():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; a socket made with proto 0
    lets Nagle's algorithm hold every response body back by a delayed ACK (~40 ms a request)."""
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_fused_checkpoint_served_with_its_kernel(served):
    """A checkpoint on the fused runtime: /model names the runtime, the table row (requested here) and
    the GEMM kernel; answers match the torch runtime's labels."""
    from ltp_compress.kernels import fused_encoder

    reason = fused_encoder.gemm_kernel_unavailable_reason("avx512_vnni")
    if reason is not None:
        pytest.skip(reason)
    ckpt = served["sst2_ckpt"]
    model = ltp_compress.load(ckpt, runtime="fused", threads=1)
    with running(model, ckpt) as (port, _, _):
        s, _, out = request(port, "POST", "/predict", {"texts": _dev_texts(3)})
        assert s == 200 and [r["label"] for r in out["results"]] == [r["label"] for r in ltp_compress.load(ckpt, runtime="torch").predict(_dev_texts(3))]
        s, _, card = request(port, "GET", "/model")
        assert card["runtime"] == "fused" and card["runtime_choice"] == "requested" and "vpdpbusd" in card["kernels"]["int8_gemm"]
