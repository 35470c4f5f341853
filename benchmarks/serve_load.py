"""Load and fault test of `ltp-compress serve` on 127.0.0.1 (not a test; the suite has short versions in
tests/test_serve.py). Writes benchmarks/results/<name>.{json,md}.

Servers (each its own process, started here, stopped with SIGTERM):
* `ours`: `ltp-compress serve EXPORT` (our pruned INT8 graph on onnxruntime; CHECKPOINT is exported to
  a work folder first unless it is an export folder);
* `dense_ort_int8`: the FP32 teacher (--teacher) as ONNX, optimised and dynamically quantised exactly as
  the `ort_int8_dynamic` peer of `ltp-compress bench` builds it (pipeline/peers/onnxruntime_peers.py),
  served by the same server code (pipeline/serve.py: same batcher, limits and endpoints) through an
  adapter that gives the plain graph our runtime's interface (this script with --serve-peer).

Measured per server: throughput (answered texts / s) and p50 / p99 latency at each --concurrency
(closed loop: C clients on keep-alive connections, each sending one dev text per request, back to
back, for --seconds). Fault scenarios, on `ours` only:
* burst: 4 x max_queue requests at once against a server with --fault-max-queue: counts of 200 / 503
  (each 503 with Retry-After), no connection error, /health answers after;
* disconnect: clients that send a request and close the socket at once: each is run anyway (counted in
  ltp_texts_total), refused because the (small) queue is full (503), seen as gone before its body was
  read (499 in /metrics) or closed before uvicorn parsed it (never accepted); the server answers the
  next request;
* shutdown: SIGTERM while requests are in flight: every request the server accepted is answered (200),
  the rest are refused (connection refused / reset, or 503); uvicorn re-raises the signal after its
  graceful shutdown, so the exit code is -15;
* mixed: --mixed requests (default 10,000), a quarter each of good single texts, good lists, invalid
  JSON and empty text, from 16 clients: zero lost or duplicated answers, every status as expected,
  the server's RSS before and after (VmRSS of its process).

    python benchmarks/serve_load.py runs/sst2_minilm/stages/12-int8_full_range/model \\
        --teacher runs/sst2_minilm/stages/01-finetune/model --data ../shared/data/glue/SST-2 --task sst2 --threads 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the dense peer, served


class PlainOrtModel:
    """A plain Hugging Face-style ONNX classifier (inputs input_ids / attention_mask / token_type_ids,
    first output the logits) with the interface pipeline/serve.py drives (encode, logits_many, ...)."""

    def __init__(self, onnx_path: Path, teacher: Path, threads: int, max_seq_length: int = 128):
        from transformers import AutoConfig, AutoTokenizer

        from ltp_compress.pipeline.peers.onnxruntime_peers import open_session

        self.session = open_session(Path(onnx_path), threads)
        self.names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(teacher))
        cfg = AutoConfig.from_pretrained(str(teacher))
        self.num_labels, self.id2label = cfg.num_labels, {int(k): v for k, v in cfg.id2label.items()}
        self.max_seq_length = max_seq_length
        self.runtime, self.backend, self.notes = "onnxruntime", f"dense ORT INT8 peer ({Path(onnx_path).name})", []
        self.last_kept_tokens = None  # dense: nothing is pruned, nothing reported

    def encode(self, texts_a, texts_b=None):
        enc = self.tokenizer(list(texts_a), None if texts_b is None else list(texts_b), truncation=True,
                             max_length=self.max_seq_length, padding=True, return_tensors="np", return_token_type_ids=True)
        return {k: enc[k].astype("int64") for k in ("input_ids", "attention_mask", "token_type_ids")}

    def logits_many(self, batches):
        return [self.session.run(None, {k: b[k] for k in self.names})[0] for b in batches]


def build_dense_peer(teacher: Path, task: str, work: Path, threads: int) -> Path:
    """The `ort_int8_dynamic` peer's model file (built by the bench peer's own functions)."""
    from transformers import AutoTokenizer

    from ltp_compress.pipeline.peers.onnxruntime_peers import build_ort_int8_dynamic

    tok = AutoTokenizer.from_pretrained(str(teacher))
    enc = tok(["a calibration sentence", "and another, a little longer one"], padding=True, return_tensors="pt", return_token_type_ids=True)
    batch = SimpleNamespace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    inp = SimpleNamespace(models={"teacher": str(teacher)}, task=task, calibration=[batch], work_dir=str(work), threads=threads,
                          batches=[1])
    system = build_ort_int8_dynamic(inp)
    return Path(next(iter(system.info["artifacts"].values()))["path"])


# ----------------------------------------------------------------------------- servers and clients


class Server:
    """A server process on 127.0.0.1 (a free port, read from its first line of output)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.lines: list[str] = []
        for _ in range(2000):  # bounded: model loading prints a few lines first
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {''.join(self.lines)}")
            self.lines.append(line)
            if "serving " in line and " on http://" in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stdout], daemon=True).start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def connect(port: int, timeout: float = 120) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY: http.client sends the headers and the body in two
    writes, which Nagle's algorithm and delayed ACKs would otherwise hold back ~40 ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict, bytes]:
    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def run_clients(client, n: int, before_join=None) -> None:
    """client(0) .. client(n - 1), each on its own thread, all at once; `before_join()` runs meanwhile."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    if before_join is not None:
        before_join()
    for t in threads:
        t.join()


def closed_loop(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(w):
        conn = connect(port)
        i = w
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            s, _, _ = post(conn, bodies[i % len(bodies)])
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                statuses[s] = statuses.get(s, 0) + 1
            i += concurrency
        conn.close()

    t0 = time.perf_counter()
    run_clients(client, concurrency)
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None
    return {"concurrency": concurrency, "requests": len(lat), "statuses": statuses, "wall_s": wall,
            "throughput_texts_per_s": statuses.get(200, 0) / wall, "p50_ms": q(0.50), "p99_ms": q(0.99)}


def burst(port: int, n: int, item) -> dict:
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def client(i):
        conn = connect(port)
        barrier.wait()
        try:
            s, h, _ = post(conn, json.dumps(item(i)).encode())
            out[i] = (s, h.get("retry-after"))
        except OSError as e:
            out[i] = (type(e).__name__, None)
        conn.close()

    run_clients(client, n)
    codes = [s for s, _ in out]
    return {"requests": n, "ok": codes.count(200), "queue_full_503": codes.count(503),
            "503_with_retry_after": sum(1 for s, ra in out if s == 503 and ra), "connection_errors": sum(1 for c in codes if isinstance(c, str)),
            "health_after": get(port, "/health")[0]}


def disconnects(port: int, n: int, item) -> dict:
    before = _metric(get(port, "/metrics")[1].decode(), "ltp_texts_total")
    body = json.dumps(item(0)).encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.close()
    m0 = get(port, "/metrics")[1].decode()
    closed0, full0 = _metric(m0, 'ltp_requests_total{status="499"}'), _metric(m0, 'ltp_requests_total{status="503"}')
    for _ in range(1000):  # bounded: each abandoned request is either run anyway or seen as gone before it was read
        m = get(port, "/metrics")[1].decode()
        ran, gone = _metric(m, "ltp_texts_total") - before, _metric(m, 'ltp_requests_total{status="499"}') - closed0
        full = _metric(m, 'ltp_requests_total{status="503"}') - full0
        if ran + gone + full >= n:
            break
        time.sleep(0.01)
    conn = connect(port, 30)
    status = post(conn, body)[0]
    conn.close()
    return {"abandoned_requests": n, "run_anyway": ran, "gone_before_read_499": gone, "refused_queue_full_503": full,
            "closed_before_the_server_parsed_them": n - ran - gone - full,
            "next_request_status": status}


def shutdown_in_flight(server: Server, n: int, item) -> dict:
    out: list = [None] * n
    started = threading.Barrier(n + 1)

    def client(i):
        conn = connect(server.port)
        started.wait()
        try:
            out[i] = post(conn, json.dumps({"texts": [item(i)] * 8}).encode())[0]
        except OSError as e:
            out[i] = type(e).__name__
        conn.close()

    rc = []

    def stop_meanwhile():
        started.wait()
        time.sleep(0.005)  # some requests accepted, some not yet sent
        rc.append(server.stop())

    run_clients(client, n, stop_meanwhile)
    rc = rc[0]
    return {"requests": n, "answered_200": out.count(200), "refused_503": out.count(503),
            "connection_errors": sum(1 for s in out if isinstance(s, str)), "other": [s for s in out if s not in (200, 503) and not isinstance(s, str)],
            "exit_code": rc}


def mixed(server: Server, n: int, workers: int, item) -> dict:
    kinds = [(lambda i: json.dumps(item(i)).encode(), 200, 1), (lambda i: json.dumps({"texts": [item(i), item(i + 1)]}).encode(), 200, 2),
             (lambda i: b'{"text": ', 400, 0), (lambda i: json.dumps({"text": ""}).encode(), 400, 0)]
    answers: list[list] = [[] for _ in range(n)]
    rss0 = server.rss_mb()

    def client(w):
        conn = connect(server.port)
        for i in range(w, n, workers):
            s, _, body = post(conn, kinds[i % 4][0](i))
            answers[i].append((s, len(json.loads(body).get("results", [])) if s == 200 else 0))
        conn.close()

    run_clients(client, workers)
    wrong = [i for i, a in enumerate(answers) if len(a) != 1 or a[0] != (kinds[i % 4][1], kinds[i % 4][2])]
    return {"requests": n, "lost": sum(1 for a in answers if not a), "duplicated": sum(1 for a in answers if len(a) > 1),
            "wrong_status_or_count": len(wrong), "rss_mb_before": rss0, "rss_mb_after": server.rss_mb()}


def _metric(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


# ----------------------------------------------------------------------------- main


def serve_peer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--serve-peer", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    a = p.parse_args(argv)
    from ltp_compress.pipeline.predict import model_task
    from ltp_compress.pipeline.serve import serve_model
    from ltp_compress.pipeline.serve_args import ServeSettings

    task, pair = model_task(a.teacher, a.task)
    serve_model(PlainOrtModel(a.serve_peer, a.teacher, a.threads), a.serve_peer,
                ServeSettings(port=0, max_batch_size=a.max_batch_size, max_queue=1024), task, pair)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--serve-peer" in argv:
        return serve_peer_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="deployable INT8 checkpoint or ONNX export folder")
    p.add_argument("--teacher", type=Path, help="FP32 teacher for the dense ORT INT8 peer (omit: ours only)")
    p.add_argument("--data", type=Path, required=True, help="folder with the task's dev.tsv")
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--seconds", type=float, default=20.0, help="per concurrency level and server")
    p.add_argument("--fault-max-queue", type=int, default=64)
    p.add_argument("--mixed", type=int, default=10000)
    p.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "results" / "tmp" / "serve_load")  # git-ignored
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="serve_load")
    args = p.parse_args(argv)

    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg
    from ltp_compress.pipeline.predict import model_task, read_tsv

    load0 = loadavg()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    export = args.checkpoint
    if not (export / "model.onnx").is_file():
        from ltp_compress.modeling.onnx_export import export_onnx

        export = export_onnx(args.checkpoint, args.work_dir / "ours_onnx")
    _, pair = model_task(args.checkpoint, args.task)
    rows = read_tsv(args.data / "dev.tsv", pair)
    bodies = [json.dumps({"text": a} if b is None else {"text": a, "text_pair": b}).encode() for a, b in rows]
    levels = [int(c) for c in args.concurrency.split(",")]
    common = ["--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size)]
    cli = [sys.executable, "-m", "ltp_compress.pipeline.cli", "serve"]
    servers = {"ours": cli + [str(export), "--port", "0", "--task", args.task, "--streams", str(args.streams), "--max-queue", "1024"] + common}
    if args.teacher:
        peer = build_dense_peer(args.teacher, args.task, args.work_dir, args.threads)
        servers["dense_ort_int8"] = [sys.executable, str(Path(__file__).resolve()), "--serve-peer", str(peer), "--teacher", str(args.teacher),
                                     "--task", args.task] + common
    res: dict = {"command": "python benchmarks/serve_load.py " + " ".join(argv), "servers": {k: " ".join(v) for k, v in servers.items()},
                 "load": {}, "faults": {}}
    for name, cmd in servers.items():
        srv = Server(cmd)
        try:
            res["load"][name] = [closed_loop(srv.port, bodies, c, args.seconds) for c in levels]
        finally:
            res["load"][name + "_exit_code"] = srv.stop()
    def item(i: int) -> dict:  # one well-formed request of the task's kind (a sentence, or a pair)
        a, b = rows[i % len(rows)]
        return {"text": a} if b is None else {"text": a, "text_pair": b}

    fault_cmd = cli + [str(export), "--port", "0", "--task", args.task, "--max-queue", str(args.fault_max_queue),
                       "--max-texts-per-request", str(min(8, args.fault_max_queue))] + common
    srv = Server(fault_cmd)
    try:
        res["faults"]["burst"] = burst(srv.port, 4 * args.fault_max_queue, item)
        res["faults"]["disconnect"] = disconnects(srv.port, 50, item)
    finally:
        res["faults"]["exit_code_after_burst_and_disconnects"] = srv.stop()
    srv = Server(servers["ours"])  # a queue that holds what 16 clients send: every answer is 200 or 400
    try:
        res["faults"]["mixed"] = mixed(srv, args.mixed, 16, item)
    finally:
        res["faults"]["mixed"]["exit_code"] = srv.stop()
    res["faults"]["shutdown"] = shutdown_in_flight(Server(servers["ours"]), 32, item)
    res["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)

    L = [f"# `ltp-compress serve` under load ({args.task})", "", environment_summary(res["environment"]), "", f"command: `{res['command']}`", "",
         "| server | concurrency | texts/s | p50 ms | p99 ms | statuses |", "|---|---|---|---|---|---|"]
    for name in servers:
        for r in res["load"][name]:
            L.append(f"| {name} | {r['concurrency']} | {r['throughput_texts_per_s']:.1f} | {r['p50_ms'] or 0:.2f} | {r['p99_ms'] or 0:.2f} | {r['statuses']} |")
    L += ["", "Faults (ours):", ""] + [f"- {k}: {json.dumps(v)}" for k, v in res["faults"].items()]
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.exit(main())
