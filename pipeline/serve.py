"""`ltp-compress serve MODEL`: an HTTP server for a deployed model (FastAPI on uvicorn), with dynamic
batching (pipeline/serve_batcher.py) on the runtime `ltp_compress.load` picks (runtime "auto": the
table in modeling/runtime_choice.py; /model reports the runtime, the row that chose it and the kernels).

Endpoints:
  POST /predict   {"text": "..."} | {"text": "...", "text_pair": "..."} |
                  {"texts": ["...", {"text": "...", "text_pair": "..."}, ...]}
                  -> 200 {"results": [{"label", "score", "tokens", "truncation", "kept_tokens"}, ...]}
                  (truncation: null, or {"tokens_before_truncation", "max_seq_length"}; kept_tokens: per
                  layer, tokens entering it). Bad input -> 400 {"error": message naming the field}
                  (invalid UTF-8 or JSON, wrong types, unknown keys, empty text, text longer than
                  max_text_chars, too many texts, a pair for a single-sentence model or the reverse);
                  a body over max_request_bytes -> 413; a full queue or a shutdown -> 503 with Retry-After;
                  a client gone before its body was read is counted as 499 in /metrics.
  GET /health     200 {"status": "ok", ...}; 503 while shutting down
  GET /metrics    Prometheus text: responses by status, latency and batch-size histograms, queue depth,
                  texts, truncated texts, input tokens, kept tokens per layer
  GET /model      the model card: task, labels, pruning, FLOPs / BOPs (the stage's meta.json, when the
                  checkpoint is in a run), runtime, backend and kernels, sha256 of the weights

Shutdown (SIGINT / SIGTERM): uvicorn stops accepting connections and waits (up to drain_timeout_s) for
the accepted requests, which the batcher still runs; then the batcher closes."""

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, model_validator

from ltp_compress.pipeline.serve_args import ServeSettings
from ltp_compress.pipeline.serve_batcher import Batcher, Metrics, QueueFull, ShuttingDown


class PairItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    text_pair: StrictStr


class PredictRequest(BaseModel):
    """Exactly one of `text` (with an optional `text_pair`) or `texts`."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr | None = None
    text_pair: StrictStr | None = None
    texts: list[StrictStr | PairItem] | None = None

    @model_validator(mode="after")
    def _one_form(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (optionally with 'text_pair') or 'texts'")
        if self.text_pair is not None and self.text is None:
            raise ValueError("'text_pair' needs 'text'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' is empty")
        return self

    def pairs(self) -> tuple[list[tuple[str, str | None]], list[str]]:
        """(text_a, text_b) per input and the field that holds it."""
        if self.texts is None:
            return [(self.text, self.text_pair)], ["text"]
        pairs = [(t, None) if isinstance(t, str) else (t.text, t.text_pair) for t in self.texts]
        return pairs, [f"texts[{i}]" for i in range(len(pairs))]


#: the status /metrics counts for a client that disconnected before its request was read (nginx's 499)
CLIENT_CLOSED = 499


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, settings: ServeSettings, expects_pair: bool | None) -> list[tuple[str, str | None]]:
    """The inputs of a POST /predict body, or BadRequest naming what is wrong (nothing runs before)."""
    from ltp_compress.modeling.prediction import check_texts

    if len(body) > settings.max_request_bytes:
        raise BadRequest(413, f"request body of {len(body)} bytes, more than max_request_bytes {settings.max_request_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BadRequest(400, f"request body is not valid JSON: {e}") from None
    try:
        req = PredictRequest.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False))
        raise BadRequest(400, msgs) from None
    pairs, fields = req.pairs()
    if len(pairs) > settings.max_texts_per_request:
        raise BadRequest(400, f"texts: {len(pairs)} texts, more than max_texts_per_request {settings.max_texts_per_request}")
    long = [f"{fields[i]}: {len(a) + len(b or '')} characters, more than max_text_chars {settings.max_text_chars}"
            for i, (a, b) in enumerate(pairs) if len(a) + len(b or "") > settings.max_text_chars]
    problems = long or check_texts(pairs, expects_pair, lambda i: fields[i])
    if problems:
        raise BadRequest(400, "; ".join(problems))
    return pairs


def run_buckets(model, pairs: list[tuple[str, str | None]], buckets: list[list[int]]) -> list[dict]:
    """Results (with details) for `pairs` run as `buckets`; single texts and pairs in separate calls."""
    from ltp_compress.modeling.prediction import predict_groups

    results: list[dict | None] = [None] * len(pairs)
    for want_pair in (False, True):
        idx = [i for i, (_, b) in enumerate(pairs) if (b is not None) == want_pair]
        if not idx:
            continue
        local = {i: k for k, i in enumerate(idx)}
        groups = [[local[i] for i in b if i in local] for b in buckets]
        groups = [g for g in groups if g]
        out = predict_groups(model, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx] if want_pair else None, groups, details=True)
        for i, r in zip(idx, out):
            results[i] = r
    return results  # type: ignore[return-value]


def model_card(model, path: Path, task: str | None, expects_pair: bool | None) -> dict:
    """What is served: task, labels, pruning, FLOPs / BOPs, runtime, sha256 of the weights (from the
    folder's own JSON and manifest; cost from the stage's meta.json when the checkpoint is in a run)."""
    path = Path(path)

    def read(p: Path) -> dict:
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        except ValueError:
            return {}

    manifest = read(path / "manifest.json").get("files", {})
    onnx_info = read(path / "ltp_onnx.json")
    if onnx_info:
        ckpt = Path(onnx_info.get("source", {}).get("checkpoint", ""))
        ltp = onnx_info
        weights = {"model.onnx": (manifest.get("model.onnx") or {}).get("sha256"),
                   "source model.safetensors": onnx_info.get("source", {}).get("weights_sha256")}
    else:
        ckpt = path
        ltp = read(path / "ltp.json")
        weights = {"model.safetensors": (manifest.get("model.safetensors") or {}).get("sha256")}
    meta = read(ckpt.parent / "meta.json") if str(ckpt) else {}
    cost = {"source": str(ckpt.parent / "meta.json"), **meta["cost"]} if meta.get("cost") else None
    q = onnx_info.get("quantization", {})
    kernels = {"int8_op": q.get("int8_op"), "attention_op": onnx_info.get("attention_op")} if onnx_info else None  # torch: /model counts them
    if model.runtime == "fused":
        kernels = {"int8_gemm": model.kernel_path()}
    return {"path": str(path), "task": task, "input": {None: "unknown", True: "sentence pair", False: "single sentence"}[expects_pair],
            "labels": {str(k): v for k, v in model.id2label.items()}, "num_labels": model.num_labels,
            "max_seq_length": model.max_seq_length, "pruning": ltp.get("pruning"),
            "quantization": {k: (ltp.get("quantization") or {}).get(k) for k in ("activation_range", "attention_matmuls", "int8_op")},
            "cost": cost, "cost_note": None if cost else "no FLOPs / BOPs: the checkpoint is not inside a run folder with meta.json",
            "runtime": model.runtime, "runtime_choice": getattr(model, "runtime_choice", "requested"), "backend": model.backend,
            "kernels": kernels, "weights_sha256": weights}


def build_app(model, settings: ServeSettings, card: dict, expects_pair: bool | None):
    """The FastAPI app and its batcher (started; the app's lifespan closes it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.requests import ClientDisconnect

    metrics = Metrics()
    batcher = Batcher(lambda pairs, buckets: run_buckets(model, pairs, buckets), max_batch_size=settings.max_batch_size,
                      max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue, bucket_ratio=settings.bucket_ratio,
                      metrics=metrics)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, settings.drain_timeout_s)

    app = FastAPI(title="ltp-compress", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics

    def answer(status: int, payload: dict, t0: float, headers: dict | None = None):
        metrics.record_response(status, time.monotonic() - t0 if status == 200 else None)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.monotonic()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
            return answer(413, {"error": f"request body of {declared} bytes, more than max_request_bytes {settings.max_request_bytes}"}, t0)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_request_bytes:
                    return answer(413, {"error": f"request body over max_request_bytes {settings.max_request_bytes}"}, t0)
        except ClientDisconnect:  # gone before its request was read: nothing to run, nobody to answer
            return answer(CLIENT_CLOSED, {"error": "client disconnected"}, t0)
        try:
            pairs = parse_request(bytes(body), settings, expects_pair)
            future = batcher.submit(pairs)
        except BadRequest as e:
            return answer(e.status, {"error": str(e)}, t0)
        except QueueFull as e:
            return answer(503, {"error": str(e)}, t0, {"Retry-After": str(e.retry_after_s)})
        except ShuttingDown as e:
            return answer(503, {"error": str(e)}, t0, {"Retry-After": "5", "Connection": "close"})
        try:
            results = await asyncio.wrap_future(future)
        except ShuttingDown as e:
            return answer(503, {"error": str(e)}, t0, {"Retry-After": "5"})
        except Exception as e:  # the runtime failed on this batch: this request is answered, the server goes on
            return answer(500, {"error": f"the runtime failed: {type(e).__name__}: {e}"}, t0)
        return answer(200, {"results": results}, t0)

    @app.get("/health")
    async def health():
        ok = batcher.accepting
        return JSONResponse({"status": "ok" if ok else "shutting down", "queue_depth": batcher.queue_depth,
                             "max_queue": settings.max_queue, "runtime": model.runtime}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(batcher.queue_depth), media_type="text/plain; version=0.0.4")

    @app.get("/model")
    async def card_endpoint():
        if model.runtime == "torch":  # the INT8 kernels that have run so far (process-wide counters)
            from ltp_compress.kernels import kernel_counters

            return JSONResponse({**card, "kernels": kernel_counters()})
        return JSONResponse(card)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free port, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it
    # Nagle's algorithm holds back the response body (written after its headers) by a delayed ACK, ~40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from ltp_compress.errors import SettingError

        raise SettingError(f"--host {host} --port {port}: cannot listen there: {e}") from None
    sock.listen(2048)
    return sock


def uvicorn_server(app, settings: ServeSettings):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                         timeout_graceful_shutdown=settings.drain_timeout_s))


def serve_model(model, path: Path, settings: ServeSettings, task: str | None, expects_pair: bool | None) -> None:
    """Serve an already loaded model until SIGINT / SIGTERM (the entry point of serve_cli and of
    benchmarks/serve_load.py's peer server)."""
    app = build_app(model, settings, model_card(model, path, task, expects_pair), expects_pair)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn_server(app, settings)

    def announce():  # once uvicorn serves (its signal handlers installed): what scripts wait for
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            print(f"serving {path} ({model.runtime}; {model.backend}) on http://{host}:{port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    print("server stopped", flush=True)


def serve_cli(args) -> int:
    from ltp_compress.modeling.runtime_choice import load_model
    from ltp_compress.pipeline.predict import model_task
    from ltp_compress.pipeline.serve_args import settings_from_args

    settings = settings_from_args(args)
    task, expects_pair = model_task(args.model, settings.task)
    model = load_model(args.model, runtime=settings.runtime, threads=settings.threads, backend=settings.backend, streams=settings.streams)
    if expects_pair is None:
        print("note: the model's task is unknown (not in a run folder; --task names it): single texts and pairs are both accepted",
              file=sys.stderr)
    serve_model(model, Path(args.model), settings, task, expects_pair)
    return 0
