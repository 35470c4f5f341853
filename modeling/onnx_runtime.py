"""ONNX Runtime deployed model: the same interface as `DeployedModel`, running an export folder
(the runtime for a folder is picked by modeling/runtime_choice.py).

`load_onnx(path)` verifies the export's manifest first (a changed, missing or extra file is
refused with an error naming it), then opens `model.onnx` with ONNX Runtime's documented CPU
latency settings (intra-op threads = `threads`, one inter-op thread, sequential execution, all
graph optimisations) and tokenises with the `tokenizers` library from the folder's
tokenizer.json (right padding, truncation to max_seq_length, the checkpoint's pad token), which
gives the same ids as the checkpoint's Hugging Face fast tokenizer.

The graph's top-level `If` on the batch size (a batch of one sequence takes its own, leaner branch)
is split at load time into two sessions, one per branch, and the batch size picks the session in
Python (`branch_sessions`, default on): faster at bs 1 and 8 than the one-session graph, identical outputs
(measured at b3ddcde on a CPU without AMX, `ort_session_ab_{sst2,mrpc}.md`, since removed as it predates the
environment block: docs/design.md, "Design notes"). The file on disk is unchanged (plain onnxruntime runs it
as one session). The price is memory: each session holds the initializers its branch reads (the embedding
table in both), and the graph is parsed in Python to split it (the end-to-end benchmark's peak RSS rose:
`benchmarks/results/design_observations.md`).
Sharing the initializers between the two sessions (`SessionOptions.add_initializer`) did not lower the
resident memory in a probe (`benchmarks/results/design_observations.md`), so it is not done;
`branch_sessions=False` loads the one graph.

`streams` > 1 is the throughput setting: the session gets threads // streams intra-op threads and
`logits_many` / `predict` run up to `streams` batches at once from a thread pool, each request on
its own threads (ONNX Runtime's `InferenceSession.Run` is thread-safe). It is the counterpart of
OpenVINO's THROUGHPUT hint; one request at a time (`streams` 1) stays the latency setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ltp_compress.errors import SettingError
from ltp_compress.modeling.prediction import predict_texts
from ltp_compress.modeling.export_format import (  # noqa: F401 (session_options re-exported: the one set of ORT settings)
    BATCH_OF_ONE_IF, ONNX_FILE, OUTPUT_NAMES, TOKENIZER_FILE, ExportError, ExportInfo, read_export_info, session_options,
)


def concurrent_pass(run_one, workers: int):
    """run_pass(batches) -> [run_one(batch) ...] in order, up to `workers` running at once (one thread
    pool; its threads start on first use). ONNX Runtime's `InferenceSession.Run` is thread-safe."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="onnx-stream")

    def run_pass(batches):
        return list(pool.map(run_one, batches))
    return run_pass


def branch_models(model) -> tuple[bytes, bytes] | None:
    """The exported graph's batch-of-one `If` (`BATCH_OF_ONE_IF`) split into two standalone serialized
    models (batch of one, any batch), each with the graph's inputs and outputs and the initializers its
    nodes read; None for a graph without it (top-k pruning: one general graph)."""
    from onnx import TensorProto, helper

    g = model.graph
    cond = [n for n in g.node if n.op_type == "If" and n.name == BATCH_OF_ONE_IF]
    if len(cond) != 1:
        return None
    out = []
    for name in ("then_branch", "else_branch"):
        b = next(a.g for a in cond[0].attribute if a.name == name)
        used = {i for n in b.node for i in n.input}
        nodes = list(b.node) + [helper.make_node("Identity", [o.name], [final]) for o, final in zip(b.output, OUTPUT_NAMES)]
        graph = helper.make_graph(nodes, name, list(g.input),
                                  [helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.INT64, None)],
                                  initializer=[t for t in g.initializer if t.name in used])
        out.append(helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString())
    return out[0], out[1]


class OnnxDeployedModel:
    """A loaded ONNX export: `predict`, `logits`, `last_kept_tokens` like `DeployedModel`. `session` runs
    every batch (the whole graph, or its general branch when `session_one` runs batches of one)."""

    #: the last layer's rows the exported graph runs past QKV (modeling/accounting.py LAST_LAYER_ROWS): every row
    last_layer_rows = "all"

    def __init__(self, session, tokenizer, info: ExportInfo, path: Path, threads: int | None, providers: list[str], streams: int = 1,
                 session_one=None):
        self.session = session
        self.session_one = session_one
        self.streams = int(streams)
        self._run_pass = concurrent_pass(self._run, self.streams) if self.streams > 1 else None
        self.tokenizer = tokenizer
        self.info = info
        self.path = path
        self.threads = threads
        self.max_seq_length = info.max_seq_length
        self.num_labels = info.num_labels
        self.id2label = {int(k): v for k, v in info.id2label.items()}
        self.last_kept_tokens: np.ndarray | None = None  # [b, L] of the last logits() call
        import onnxruntime as ort

        self.runtime = "onnxruntime"
        self.backend = (f"onnxruntime {ort.__version__} {','.join(session.get_providers())} ({info.quantization.int8_op})"
                        + (", batch-of-one branch as its own session" if session_one is not None else "")
                        + (f", {self.streams} concurrent streams" if self.streams > 1 else ""))
        self.notes: list[str] = []

    def encode(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Tokenise, right-pad to the longest in the batch: {input name: int64 [b, s]}."""
        pairs = list(texts_a) if texts_b is None else list(zip(texts_a, texts_b))
        enc = self.tokenizer.encode_batch(pairs)
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}

    def _run(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(logits [b, C], kept tokens [b, L]) for a batch: a dict or object with input_ids,
        attention_mask (and token_type_ids) arrays or torch tensors [b, s]."""
        get = (lambda k: batch.get(k)) if isinstance(batch, dict) else (lambda k: getattr(batch, k, None))
        ids = _as_int64(get("input_ids"))
        mask, tt = get("attention_mask"), get("token_type_ids")
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else _as_int64(mask),
                "token_type_ids": np.zeros_like(ids) if tt is None else _as_int64(tt)}
        session = self.session_one if self.session_one is not None and ids.shape[0] == 1 else self.session
        logits, kept = session.run(list(OUTPUT_NAMES), feed)
        return logits, kept

    def logits(self, batch) -> np.ndarray:
        """Logits [b, num_labels] (float32 numpy) for a batch: a dict or object with input_ids,
        attention_mask (and token_type_ids) arrays or torch tensors [b, s]."""
        logits, self.last_kept_tokens = self._run(batch)
        return logits

    def logits_many(self, batches: Sequence) -> list[np.ndarray]:
        """Logits of each batch, in order; with streams > 1 up to `streams` batches run at once.
        last_kept_tokens: every batch's rows, concatenated in order."""
        outs = self._run_pass(batches) if self._run_pass is not None else [self._run(b) for b in batches]
        if outs:
            self.last_kept_tokens = np.concatenate([k for _, k in outs])
        return [lg for lg, _ in outs]

    def predict(self, texts_a, texts_b=None, batch_size: int = 32) -> list[dict]:
        """[{"label": name, "score": probability of that label}] per input (regression:
        {"label": "score", "score": value}); see modeling.prediction.predict_texts."""
        return predict_texts(self, texts_a, texts_b, batch_size)


def _as_int64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def load_onnx(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
              streams: int = 1, branch_sessions: bool = True) -> OnnxDeployedModel:
    """Verify, then load an ONNX export folder (see modeling/export_format.py; written by modeling/onnx_export/).

    `threads`: ONNX Runtime threads in all (None: ORT's default, one per physical core);
    `providers`: execution providers (default CPUExecutionProvider); `streams`: batches run at
    once by `logits_many` / `predict`, each with threads // streams intra-op threads (at least 1);
    `branch_sessions`: the graph's batch-of-one branch as its own session (see the module doc; False:
    one session on the graph as it is on disk, as plain onnxruntime runs it)."""
    import os

    import onnxruntime as ort
    from tokenizers import Tokenizer

    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise SettingError(f"streams: expected an integer >= 1, got {streams!r}")
    if streams > 1:
        threads = max(1, (threads or os.cpu_count() or 1) // streams)
    path = Path(path)
    info = read_export_info(path)  # verifies the manifest FIRST: nothing is parsed before the bytes are known to be intact
    so = session_options(threads)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    try:
        branches = None
        if branch_sessions:
            import onnx

            branches = branch_models(onnx.load(str(path / ONNX_FILE)))
        if branches is None:
            session, session_one = ort.InferenceSession(str(path / ONNX_FILE), so, providers=providers), None
        else:
            session_one, session = (ort.InferenceSession(b, so, providers=providers) for b in branches)
    except Exception as e:  # ORT and onnx raise their own error types
        raise ExportError(f"{path / ONNX_FILE}: onnxruntime cannot load it: {e}") from None
    try:
        tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as e:
        raise ExportError(f"{path / TOKENIZER_FILE}: cannot load the tokenizer: {e}") from None
    tok.enable_truncation(info.max_seq_length)
    tok.enable_padding(pad_id=info.pad_token_id, pad_token=info.pad_token)
    return OnnxDeployedModel(session, tok, info, path, threads, providers, streams, session_one=session_one)
