"""ONNX export with in-graph token pruning and INT8 (modeling/onnx_export/), the onnxruntime
deployed runtime (modeling/onnx_runtime.py), `ltp_compress.load(runtime=...)` and the export CLI.

Tiny 2-layer d=32 BERT / RoBERTa (conftest), quantised and saved as deployable checkpoints here.
With 2 layers only layer 0 prunes (the last layer never does), so "tokens entering layer 1" is
where pruning shows.

Logit tolerance (rtol 1e-3, atol 1e-5; logits here are ~1e-2, differences measured ~1e-9): the graph and the torch
runtime run the same integer GEMMs on the same int8 values with the same scales, so the int32
accumulators are identical; the float parts (epilogue scale order, LayerNorm, softmax, GELU,
reductions) may round differently in the last bits, and in rare cases such a difference moves an
activation across a rounding boundary of the next layer's quantiser (one int8 step), which shows
as a difference of about x_scale * |w| downstream. Kept tokens must be equal: thresholds are
chosen from the score distribution in the middle of a wide gap, far from any score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import ltp_compress
from ltp_compress.modeling.deploy import CheckpointError, load_deployable, save_deployable
from ltp_compress.modeling.onnx_export import (INT8_OPS, INTEGER_GEMM_OPS, MANIFEST_FILE, ONNX_CONFIG_FILE, ONNX_FILE,
                                               ExportError, export_onnx)
from ltp_compress.modeling.onnx_runtime import load_onnx, session_options
from ltp_compress.modeling.pruned_encoder import PruningConfig

from conftest import DEMO_DATA, REPO

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RTOL, ATOL = 1e-3, 1e-5


def _dev_texts(n: int = 40) -> list[str]:
    return [l.split("\t")[0] for l in (DEMO_DATA / "dev.tsv").read_text().splitlines()[1:1 + n]]


def _mixed_batch(k: int = 7) -> list[str]:
    """k dev sentences of clearly different lengths (shortest to longest, interleaved)."""
    texts = sorted(_dev_texts(), key=len)
    picks = [texts[round(i * (len(texts) - 1) / (k - 1))] for i in range(k)]
    return picks[::2] + picks[1::2]


# ----------------------------------------------------------------------------- checkpoints


def _calibration_batches(tok) -> list:
    """Two batches of 16 dev sentences with the attributes calibrate reads."""
    from types import SimpleNamespace

    texts = _dev_texts(32)
    batches = []
    for i in range(0, 32, 16):
        enc = tok(texts[i:i + 16], padding=True, return_tensors="pt")
        batches.append(SimpleNamespace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                       token_type_ids=enc.get("token_type_ids")))
    return batches


class _Quantised:
    """One calibrated INT8 model per architecture; checkpoints differ only in their pruning rule."""

    def __init__(self, src: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ltp_compress.modeling.quantized import calibrate, convert_to_int8

        model = AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="eager").eval()
        self.tok = AutoTokenizer.from_pretrained(src)
        self.qmodel, self.info = convert_to_int8(model, calibrate(model, _calibration_batches(self.tok), PruningConfig()), "auto")

    def checkpoint(self, pruning: PruningConfig, dst: Path) -> Path:
        return save_deployable(self.qmodel, self.tok, pruning, self.info, dst)


def _branch_ops(model, branch: str) -> Counter | None:
    """Op types of the graph a batch takes: with the `If` on the batch size, its `branch`
    (then_branch: one sequence, else_branch: several), else (no `If`) the graph itself for the
    else_branch and None for the then_branch."""
    top = list(model.graph.node)
    cond = [n for n in top if n.op_type == "If"]
    if not cond:
        return Counter(n.op_type for n in top) if branch == "else_branch" else None
    sub = next(a.g for a in cond[0].attribute if a.name == branch)
    return Counter(n.op_type for n in sub.node)


def _feed(enc) -> dict[str, np.ndarray]:
    return {k: enc[k].numpy().astype(np.int64) for k in INPUTS}


def _scores(ckpt: Path, feed: dict, layer: int) -> np.ndarray:
    """The pruning score of `layer` ([b, S]) in the checkpoint's graph for any batch (the `If`
    branch a batch of several takes, built alone) exposed as an extra output (unoptimised session)."""
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from ltp_compress.modeling.onnx_export import build_onnx_model

    m, _ = build_onnx_model(load_file(str(ckpt / "model.safetensors")), json.loads((ckpt / "config.json").read_text()),
                            json.loads((ckpt / "ltp.json").read_text()), batch_of_one_branch=False)
    m.graph.output.append(onnx.helper.make_tensor_value_info(f"prune.{layer}.score", onnx.TensorProto.FLOAT, None))
    so = session_options(graph_optimization_level="ORT_DISABLE_ALL")  # the score output is fused away otherwise
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run([f"prune.{layer}.score"], feed)[0]


def _threshold_away_from_ties(scores: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Midpoint of the widest gap between the middle half of the sorted real-token scores
    (position 0 excluded: always kept) and half that gap (the margin to the nearest score)."""
    real = np.sort(scores[:, 1:][mask[:, 1:].astype(bool)])
    lo, hi = len(real) // 4, 3 * len(real) // 4
    gaps = np.diff(real[lo:hi + 1])
    i = int(np.argmax(gaps))
    return float((real[lo + i] + real[lo + i + 1]) / 2), float(gaps[i] / 2)


@pytest.fixture(scope="module")
def quantised(tiny_bert, tiny_roberta) -> dict[str, _Quantised]:
    return {"bert": _Quantised(tiny_bert), "roberta": _Quantised(tiny_roberta)}


@pytest.fixture(scope="module")
def pruned_exports(quantised, tmp_path_factory) -> dict[str, tuple[Path, Path, float]]:
    """Per architecture: (checkpoint, export, margin) with a layer-0 threshold chosen from the
    score distribution of the mixed batch (the export's layer-0 score does not depend on it)."""
    out = {}
    for kind, q in quantised.items():
        root = tmp_path_factory.mktemp(f"onnx_{kind}")
        probe = q.checkpoint(PruningConfig(mode="threshold", thresholds=[1.0, 1.0]), root / "probe_ckpt")
        enc = q.tok(_mixed_batch(), padding=True, return_tensors="pt", return_token_type_ids=True)
        th, margin = _threshold_away_from_ties(_scores(probe, _feed(enc), 0), enc["attention_mask"].numpy())
        ckpt = q.checkpoint(PruningConfig(mode="threshold", thresholds=[th, 1.0]), root / "ckpt")
        out[kind] = (ckpt, export_onnx(ckpt, root / "onnx", parity_texts=_dev_texts()), margin)
    return out


def _compare(ckpt: Path, export: Path, texts: list[str], batch_size: int) -> np.ndarray:
    """Run both runtimes batch by batch; assert equal kept tokens and close logits. Returns the
    kept tokens [n, L]."""
    dm = load_deployable(ckpt)
    om = load_onnx(export, threads=1)
    kept_all = []
    for s in range(0, len(texts), batch_size):
        enc = dm.encode(texts[s:s + batch_size])
        ref = dm.logits(enc).numpy()
        got = om.logits(enc)
        np.testing.assert_array_equal(om.last_kept_tokens, dm.last_kept_tokens.numpy())
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
        # the runtime's own tokenisation (tokenizers library) gives the same ids
        own = om.encode(texts[s:s + batch_size])
        for k in INPUTS:
            np.testing.assert_array_equal(own[k], enc[k].numpy())
        kept_all.append(om.last_kept_tokens)
    return np.concatenate(kept_all)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pruned_graph_matches_torch_runtime_mixed_lengths(pruned_exports, quantised, kind):
    ckpt, export, margin = pruned_exports[kind]
    assert margin > 1e-5  # the threshold is far from every score (float-order differences in a score are ~1e-7)
    texts = _mixed_batch()
    kept7 = _compare(ckpt, export, texts, batch_size=7)
    kept1 = _compare(ckpt, export, texts, batch_size=1)
    np.testing.assert_array_equal(kept7, kept1)  # batching never changes what is kept
    lengths = quantised[kind].tok(texts, padding=True, return_tensors="np")["attention_mask"].sum(1)
    assert kept7[:, 0].tolist() == lengths.tolist()
    assert (kept7[:, 1] < kept7[:, 0]).sum() >= 4 and (kept7[:, 1] > 1).any()  # really pruned, not everything
    # export-time parity (real sentences, mixed-length batches of 8) recorded in the manifest
    parity = json.loads((export / MANIFEST_FILE).read_text())["parity"]
    assert parity["examples"] == 40 and parity["argmax_agreement"] == 1.0 and parity["kept_tokens_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] < ATOL


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_graph_activation_scales_are_the_checkpoints(pruned_exports, kind):
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    ckpt, export, _ = pruned_exports[kind]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(export / ONNX_FILE)).graph.initializer}
    tensors = load_file(str(ckpt / "model.safetensors"))
    info = json.loads((export / ONNX_CONFIG_FILE).read_text())
    gemms = info["quantization"]["int8_gemms"]
    covered = {n for g in gemms for n in g["layers"]}
    assert covered == set(json.loads((ckpt / "ltp.json").read_text())["quantization"]["int8_layers"])
    for g in gemms:
        xs = inits[g["x_scale_initializer"]]
        assert xs.shape == () and xs.dtype == np.float32
        for layer in g["layers"]:
            assert xs == tensors[f"{layer}.x_scale"]  # exactly the checkpoint's scale
        w = inits[g["weight_initializer"]]  # [K, N] int8: the checkpoint's weights, transposed
        np.testing.assert_array_equal(w, np.concatenate([tensors[f"{n}.w_q"] for n in g["layers"]], 0).T)
    # Q, K and V share their scale (one calibration input): one GEMM per layer in the batch-of-one branch,
    # three GEMMs reading that GEMM's quantised input (the same x_scale initializer) in the batch graph
    fused = [g for g in gemms if len(g["layers"]) == 3]
    assert len(gemms) == 2 * (4 + 3) + 2 and len(fused) == 2
    for g in fused:
        singles = [h for h in gemms if len(h["layers"]) == 1 and h["layers"][0] in g["layers"]]
        assert [h["layers"][0] for h in singles] == g["layers"]
        assert {h["x_scale_initializer"] for h in singles} == {g["x_scale_initializer"]}
    # the thresholds are initializers
    th = json.loads((ckpt / "ltp.json").read_text())["pruning"]["thresholds"]
    assert inits["prune.threshold.0"] == np.float32(th[0])


def _profile(export: Path, feed: dict) -> list[dict]:
    import onnxruntime as ort

    so = session_options(profile_prefix=str(export.parent / f"profile-{export.name}"))
    sess = ort.InferenceSession(str(export / ONNX_FILE), so, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


@pytest.mark.parametrize("int8_op", ["MatMulIntegerToFloat", "MatMulInteger"])
def test_profile_shows_integer_gemms_and_accountant_charges_them(pruned_exports, quantised, tmp_path, int8_op):
    """ORT's profile: one integer GEMM per int8 GEMM node of the graph (MatMulIntegerToFloat or
    MatMulInteger), float MatMul only for the 2 attention products per layer; the rows each
    encoder GEMM ran equal the kept tokens, and its MACs equal what the accountant charges."""
    from ltp_compress.modeling.accounting import EncoderShape, layer_macs, tokens_leaving_layers

    ckpt, default_export, _ = pruned_exports["bert"]
    export = default_export if int8_op == "MatMulIntegerToFloat" else export_onnx(ckpt, tmp_path / "mmi", int8_op=int8_op)
    info = json.loads((export / ONNX_CONFIG_FILE).read_text())
    assert info["quantization"]["int8_op"] == int8_op
    enc = quantised["bert"].tok(_mixed_batch(), padding=True, return_tensors="pt", return_token_type_ids=True)
    om = load_onnx(export)
    om.logits(enc)
    kept = om.last_kept_tokens  # [b, L]
    nodes = _profile(export, _feed(enc))
    ops = Counter(e["args"]["op_name"] for e in nodes)
    gemm_ops = {op: n for op, n in ops.items() if op in INTEGER_GEMM_OPS}
    # the batch graph's GEMM nodes (Q, K, V three GEMMs there: 6 per layer, + pooler and classifier)
    batch_gemms = [g for g in info["quantization"]["int8_gemms"] if "batch" in g["graphs"]]
    assert gemm_ops == {int8_op: len(batch_gemms)} == {int8_op: 2 * 6 + 2}
    float_mm = {op: n for op, n in ops.items() if op in ("MatMul", "FusedMatMul", "Gemm")}
    # the default export (opset 23): one float Attention kernel per layer and the scores' column sums at the
    # pruning layer as the only float MatMul; no quantised linear fell back to float
    assert info["attention_op"] == "Attention" and ops["Attention"] == 2
    assert sum(float_mm.values()) == 1
    for e in nodes:
        if e["args"]["op_name"] in float_mm:
            assert len(e["args"]["output_type_shape"][0]["float"]) == 4  # [b, H, 1, S]: scoring only
    # rows per encoder GEMM = tokens entering (QKV) / leaving (out proj, FFN) each layer; MACs = accountant's
    cfg = json.loads((ckpt / "config.json").read_text())
    shape = EncoderShape(num_layers=2, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"])
    n_out = tokens_leaving_layers(kept)
    macs = Counter()
    for e in nodes:
        if e["args"]["op_name"] == int8_op and ".encoder.layer." in e["name"]:
            l = int(e["name"].split(".encoder.layer.")[1].split(".")[0])
            m, k = next(iter(e["args"]["input_type_shape"][0].values()))
            n = next(iter(e["args"]["output_type_shape"][0].values()))[1]
            part = "qkv_proj" if "attention.self" in e["name"] else "out_proj" if "attention.output" in e["name"] else "ffn"
            assert m == (kept[:, l].sum() if part == "qkv_proj" else n_out[:, l].sum()), e["name"]
            macs[part] += m * k * n
    charged = Counter()
    for l in range(2):
        for part, v in layer_macs(kept[:, l], shape.hidden, shape.intermediate, n_out=n_out[:, l]).items():
            charged[part] += float(np.sum(v))
    assert {p: float(v) for p, v in macs.items()} == {p: charged[p] for p in ("qkv_proj", "out_proj", "ffn")}


@pytest.mark.parametrize("kind,mode,opset", [("roberta", "topk", 17), ("bert", "none", 20), ("roberta", "none", 17)])
def test_topk_and_dense_checkpoints_export_and_match(quantised, tmp_path, kind, mode, opset):
    import onnx

    q = quantised[kind]
    pruning = PruningConfig(mode="topk", keep_ratios=[0.5, 0.5]) if mode == "topk" else PruningConfig()
    ckpt = q.checkpoint(pruning, tmp_path / "ckpt")
    export = export_onnx(ckpt, tmp_path / "onnx", parity_texts=_mixed_batch(), opset=opset)
    texts = _mixed_batch()
    kept = _compare(ckpt, export, texts, batch_size=7)
    lengths = q.tok(texts, padding=True, return_tensors="np")["attention_mask"].sum(1)
    model = onnx.load(str(export / ONNX_FILE))
    ops, one = _branch_ops(model, "else_branch"), _branch_ops(model, "then_branch")
    assert ops["Gelu" if opset >= 20 else "Erf"] == 2  # exact GELU after each layer's FFN input GEMM
    assert (load_onnx(export).session_one is None) == (mode == "topk")  # no batch-of-one session without the branch
    if mode == "topk":
        assert one is None  # top-k keeps its one graph
    else:  # the batch-of-one branch: the same GEMMs, none of the padding machinery
        assert one["MatMulIntegerToFloat"] == ops["MatMulIntegerToFloat"] and not {"Where", "Less", "ReduceMax"} & set(one)
        assert sum(one.values()) < 0.75 * sum(ops.values())
    if mode == "none":
        assert (kept == lengths[:, None]).all()
        assert not {"Greater", "TopK", "Compress"} & set(ops)  # dense INT8: no pruning ops
    else:
        assert kept[:, 1].tolist() == np.minimum(np.maximum(np.ceil(lengths * 0.5), 1), lengths).astype(int).tolist()
        assert ops["TopK"] == 1


@pytest.mark.parametrize("activation_range", ["symmetric", "full"])
def test_saturating_activations_follow_the_checkpoints_range(quantised, tmp_path, activation_range):
    """Activation scales 16x too small: many inputs fall below -127.5 * x_scale. ONNX QuantizeLinear
    alone gives -128 (u8 0) there: the 'full' range [-128, 127] of the reference, exported with no
    clamp at all; a 'symmetric' checkpoint clamps to -127, exported as Max(x, -127 * x_scale)
    before each quantisation (but the FFN output projection's, which reads GELU outputs). Both must
    reproduce the torch runtime."""
    import copy

    from ltp_compress.kernels import ACTIVATION_RANGES, Int8Linear

    q = quantised["bert"]
    qmodel, info = copy.deepcopy(q.qmodel), copy.deepcopy(q.info)
    info.activation_range = activation_range
    for mod in qmodel.modules():
        if isinstance(mod, Int8Linear):
            mod.x_scale.div_(16)
            mod.act_qmin = ACTIVATION_RANGES[activation_range]
            mod._invalidate()
    ckpt = save_deployable(qmodel, q.tok, PruningConfig(), info, tmp_path / "ckpt")
    assert json.loads((ckpt / "ltp.json").read_text())["quantization"]["activation_range"] == activation_range
    export = export_onnx(ckpt, tmp_path / "onnx", parity_texts=_mixed_batch())
    assert json.loads((export / "ltp_onnx.json").read_text())["quantization"]["activation_range"] == activation_range
    dm = load_deployable(ckpt)
    assert {m.act_qmin for m in dm.model.modules() if isinstance(m, Int8Linear)} == {ACTIVATION_RANGES[activation_range]}
    below = []
    lin = dm.model.get_submodule("bert.encoder.layer.0.attention.output.dense")
    hook = lin.register_forward_pre_hook(lambda m, args: below.append(float((args[0] / m.x_scale).min())))
    dm.logits(dm.encode(_mixed_batch()))
    hook.remove()
    _compare(ckpt, export, _mixed_batch(), batch_size=7)
    _compare(ckpt, export, _mixed_batch()[:2], batch_size=1)
    assert min(below) < -128  # saturation really happens on the negative side
    import onnx

    model = onnx.load(str(export / "model.onnx"))
    # 'symmetric': one Max per quantisation (with scales this small even the FFN output projection's
    # GELU input can reach -127 * x_scale); 'full': none
    for branch in ("then_branch", "else_branch"):
        ops = _branch_ops(model, branch)
        assert ops["QuantizeLinear"] >= 4 * 2 + 2, branch  # 4 per layer (QKV once), pooler, classifier
        assert ops["Max"] == {"symmetric": ops["QuantizeLinear"], "full": 0}[activation_range], branch


def test_checkpoint_with_unknown_activation_range_refused(quantised, tmp_path):
    """An ltp.json naming an activation range this version does not know is refused by the torch
    loader and by the exporter, naming the file and the key; one without the key (written before it
    existed) is read as 'symmetric'."""
    import copy

    from ltp_compress.manifest import write_manifest
    from ltp_compress.modeling.checkpoint_format import FORMAT, FORMAT_VERSION

    q = quantised["bert"]
    info = copy.deepcopy(q.info)
    info.activation_range = "symmetric"
    ckpt = save_deployable(q.qmodel, q.tok, PruningConfig(), info, tmp_path / "ckpt")
    ltp = json.loads((ckpt / "ltp.json").read_text())
    ltp["quantization"]["activation_range"] = "asymmetric"
    (ckpt / "ltp.json").write_text(json.dumps(ltp))
    write_manifest(ckpt, FORMAT, FORMAT_VERSION)  # a consistent manifest: only the content is wrong
    with pytest.raises(CheckpointError, match=r"ltp\.json.*activation_range.*asymmetric"):
        load_deployable(ckpt)
    with pytest.raises(CheckpointError, match=r"ltp\.json.*activation_range.*asymmetric"):
        export_onnx(ckpt, tmp_path / "onnx")
    # a checkpoint written before the key existed: [-127, 127], and its export keeps the clamps
    from ltp_compress.kernels import Int8Linear

    del ltp["quantization"]["activation_range"]
    (ckpt / "ltp.json").write_text(json.dumps(ltp))
    write_manifest(ckpt, FORMAT, FORMAT_VERSION)
    assert {m.act_qmin for m in load_deployable(ckpt).model.modules() if isinstance(m, Int8Linear)} == {-127}
    export = export_onnx(ckpt, tmp_path / "onnx_legacy")
    assert json.loads((export / "ltp_onnx.json").read_text())["quantization"]["activation_range"] == "symmetric"


@pytest.mark.parametrize("damage", ["flip", "extra", "missing", "manifest_drop"])
def test_tampered_export_refused(pruned_exports, tmp_path, damage):
    import shutil

    src = pruned_exports["bert"][1]
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    if damage == "flip":
        data = bytearray((d / ONNX_FILE).read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / ONNX_FILE).write_bytes(bytes(data))
        expect = (ONNX_FILE, "sha256")
    elif damage == "extra":
        (d / "extra.onnx").write_bytes(b"x")
        expect = ("extra.onnx", "not listed")
    elif damage == "missing":
        (d / "tokenizer.json").unlink()
        expect = ("tokenizer.json", "missing")
    else:
        m = json.loads((d / MANIFEST_FILE).read_text())
        del m["files"][ONNX_CONFIG_FILE]
        (d / MANIFEST_FILE).write_text(json.dumps(m))
        expect = (ONNX_CONFIG_FILE, "not listed")
    for load in (load_onnx, ltp_compress.load):  # auto picks onnxruntime for a folder with model.onnx
        with pytest.raises(ExportError) as ei:
            load(d)
        assert expect[0] in str(ei.value) and expect[1] in str(ei.value), str(ei.value)
    assert isinstance(ei.value, CheckpointError)  # the CLI prints it as a user error


def _edited_export(src: Path, dst: Path, edit) -> Path:
    """A copy of the export whose ltp_onnx.json went through `edit(info dict)`, with a consistent manifest."""
    import shutil

    from ltp_compress.manifest import write_manifest
    from ltp_compress.modeling.export_format import EXPORT_FORMAT, EXPORT_FORMAT_VERSION

    shutil.copytree(src, dst)
    info = json.loads((dst / ONNX_CONFIG_FILE).read_text())
    edit(info)
    (dst / ONNX_CONFIG_FILE).write_text(json.dumps(info, indent=2))
    write_manifest(dst, EXPORT_FORMAT, EXPORT_FORMAT_VERSION)
    return dst


@pytest.mark.parametrize("damage,field", [
    ("unknown_top", "colour"), ("unknown_quantization", "quantization.int8_kernel"), ("wrong_type", "num_labels"),
    ("wrong_op", "quantization.int8_op"), ("inputs", "inputs"), ("missing", "pad_token_id"),
])
def test_ltp_onnx_json_unknown_field_or_wrong_type_refused(pruned_exports, tmp_path, damage, field):
    """The typed reader of ltp_onnx.json (export_format.ExportInfo): an unknown key, a wrong type or a
    missing key is an ExportError naming the file and the field."""
    def edit(info):
        if damage == "unknown_top":
            info["colour"] = "blue"
        elif damage == "unknown_quantization":
            info["quantization"]["int8_kernel"] = "MatMulInteger"
        elif damage == "wrong_type":
            info["num_labels"] = "two"
        elif damage == "wrong_op":
            info["quantization"]["int8_op"] = "QGemm"
        elif damage == "inputs":
            info["inputs"] = ["input_ids"]
        else:
            del info["pad_token_id"]

    d = _edited_export(pruned_exports["bert"][1], tmp_path / "e", edit)
    for load in (load_onnx, ltp_compress.load):
        with pytest.raises(ExportError) as ei:
            load(d)
        assert f"{d / ONNX_CONFIG_FILE}: " in str(ei.value) and f"'{field}'" in str(ei.value), str(ei.value)


def test_older_export_description_still_loads(pruned_exports, tmp_path):
    """An export written before activation_range, attention_op and the INT8 attention keys existed loads."""
    ckpt, src, _ = pruned_exports["bert"]

    def old(info):
        for key in ("activation_range", "attention_matmuls", "int8_attention_gemms", "attention_scheme"):
            del info["quantization"][key]
        del info["attention_op"]

    om = load_onnx(_edited_export(src, tmp_path / "old", old), threads=1)
    assert om.info.quantization.activation_range == "symmetric" and om.info.attention_op is None
    texts = _dev_texts(5)
    np.testing.assert_array_equal(om.logits(om.encode(texts)), load_onnx(src, threads=1).logits(om.encode(texts)))


def test_load_runtimes_and_predict(pruned_exports):
    ckpt, export, _ = pruned_exports["roberta"]
    om = ltp_compress.load(export, threads=1)
    tm = ltp_compress.load(ckpt, runtime="torch")
    assert om.runtime == "onnxruntime" and "onnxruntime" in om.backend and om.session.get_session_options().intra_op_num_threads == 1
    assert om.runtime_choice == "auto: ONNX export (model.onnx) on any x86-64 -> onnxruntime"
    assert tm.runtime == "torch" and tm.runtime_choice == "requested"
    with pytest.raises(CheckpointError):  # an export folder is not a safetensors checkpoint
        ltp_compress.load(export, runtime="torch")
    with pytest.raises(ExportError, match="runtime 'tensorrt'"):
        ltp_compress.load(export, runtime="tensorrt")
    texts = _dev_texts(11)
    a, b = om.predict(texts, batch_size=4), tm.predict(texts, batch_size=4)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-4)
    pair = om.predict(["a good movie"], ["really"])
    assert pair[0]["label"] == tm.predict(["a good movie"], ["really"])[0]["label"]
    assert om.predict([]) == []
    # the throughput setting: 2 batches at once, one intra-op thread each, same results in the same order
    sm = ltp_compress.load(export, threads=2, streams=2)
    assert sm.session.get_session_options().intra_op_num_threads == 1 and "2 concurrent streams" in sm.backend
    assert sm.predict(texts, batch_size=3) == om.predict(texts, batch_size=3)
    batches = [om.encode(texts[i:i + 3]) for i in range(0, len(texts), 3)]
    one_by_one = [(om.logits(b), om.last_kept_tokens) for b in batches]
    many = sm.logits_many(batches)
    assert all(np.array_equal(x, y) for x, (y, _) in zip(many, one_by_one))
    assert np.array_equal(sm.last_kept_tokens, np.concatenate([k for _, k in one_by_one]))
    torch_many = tm.logits_many([tm.encode(texts[i:i + 3]) for i in range(0, len(texts), 3)])
    assert np.concatenate([t.numpy() for t in torch_many]).argmax(-1).tolist() == np.concatenate(many).argmax(-1).tolist()
    assert tm.last_kept_tokens.shape[0] == len(texts)
    with pytest.raises(ValueError, match="streams"):
        ltp_compress.load(ckpt, runtime="torch", streams=2)  # torch runs one batch at a time: said, not ignored
    with pytest.raises(ValueError, match="streams"):
        ltp_compress.load(export, streams=0)


def test_branch_sessions_equal_the_whole_graph(pruned_exports):
    """load_onnx runs the graph's batch-of-one branch as its own session (the batch size picks it): the same
    logits and kept tokens as the whole graph in one session, as plain onnxruntime runs it, at bs 1 and 7."""
    _, export, _ = pruned_exports["bert"]
    split, whole = load_onnx(export, threads=1), load_onnx(export, threads=1, branch_sessions=False)
    assert whole.session_one is None and "own session" not in whole.backend
    assert split.session_one is not None and "batch-of-one branch as its own session" in split.backend

    class Counting:  # which session ran
        def __init__(self, session):
            self.session, self.calls = session, 0

        def run(self, *a, **k):
            self.calls += 1
            return self.session.run(*a, **k)

    split.session_one, split.session = Counting(split.session_one), Counting(split.session)
    texts = _mixed_batch()
    for bs in (1, 7):
        for i in range(0, len(texts), bs):
            enc = split.encode(texts[i:i + bs])
            np.testing.assert_array_equal(split.logits(enc), whole.logits(enc))
            np.testing.assert_array_equal(split.last_kept_tokens, whole.last_kept_tokens)
    assert (split.session_one.calls, split.session.calls) == (len(texts), 1)


def _readme_ort_snippet() -> str:
    """The README's ONNX Runtime snippet (between its `ort-snippet` markers): the README owns it."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- ort-snippet -->", 1)[1].split("<!-- /ort-snippet -->", 1)[0]
    return block.split("```python\n", 1)[1].rsplit("```", 1)[0]


def test_readme_snippet_runs_without_ltp_compress(pruned_exports, tmp_path):
    ckpt, export, _ = pruned_exports["bert"]
    snippet = tmp_path / "snippet.py"
    snippet.write_text(_readme_ort_snippet())
    code = ("import sys; sys.modules['ltp_compress'] = None\n"
            "try:\n    import ltp_compress\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('ltp_compress importable')\n"
            f"sys.argv = ['snippet', {str(export)!r}]\n"
            f"exec(compile(open({str(snippet)!r}).read(), 'snippet', 'exec'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    dm = load_deployable(ckpt)
    texts = [line.split("] ", 1)[1] for line in lines]
    assert len(texts) == 2
    ref = dm.predict(texts)
    enc = dm.encode(texts)
    dm.logits(enc)
    for line, want, kept in zip(lines, ref, dm.last_kept_tokens.tolist()):
        assert line.split(" ")[0] == want["label"]
        assert f"tokens per layer: {kept}" in line


def test_export_cli(pruned_exports, tmp_path, capsys):
    import argparse

    from ltp_compress.pipeline.export_cli import add_export_parser, export_cli

    ckpt = pruned_exports["roberta"][0]
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in _dev_texts(12)))
    args = parser.parse_args(["export", str(ckpt), str(tmp_path / "out"), "--parity-tsv", str(tsv), "--parity-examples", "10"])
    assert export_cli(args) == 0
    out = capsys.readouterr().out
    assert "exported:" in out and "on 10 examples" in out
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["parity"]["examples"] == 10 and manifest["parity"]["inputs"] == "given texts"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # atomic: no leftovers
    bad = parser.parse_args(["export", str(tmp_path / "nope"), str(tmp_path / "out2")])
    with pytest.raises(CheckpointError, match="nope"):
        export_cli(bad)
    with pytest.raises(ExportError, match="opset 3"):
        export_cli(parser.parse_args(["export", str(ckpt), str(tmp_path / "out3"), "--opset", "3"]))
    with pytest.raises(ExportError, match="inside"):
        export_cli(parser.parse_args(["export", str(ckpt), str(ckpt / "onnx")]))
    # building the parser imported nothing heavy
    code = ("import argparse, sys; from ltp_compress.pipeline.export_cli import add_export_parser; "
            "add_export_parser(argparse.ArgumentParser().add_subparsers()); assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_import_stays_cheap():
    code = ("import sys, ltp_compress; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_int8_attention_exports_as_integer_matmuls_and_matches_torch(tiny_bert, tiny_roberta, tmp_path, kind):
    """A checkpoint quantised with attention_matmuls: int8 exports Q·Kᵀ and P·V as MatMulInteger
    (int8 x int8, uint8 x int8) with the checkpoint's q/k/v scales; ORT's profile runs no float
    MatMul at all; kept tokens equal and logits agree with the torch runtime at bs 7 and 1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ltp_compress.modeling.quantized import attach_int8_attention, calibrate, calibrate_attention, convert_to_int8

    src = tiny_bert if kind == "bert" else tiny_roberta
    model = AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(src)
    batches = _calibration_batches(tok)
    qmodel, info = convert_to_int8(model, calibrate(model, batches, PruningConfig()), "auto")
    att = calibrate_attention(model, batches, PruningConfig())
    attach_int8_attention(qmodel, att)
    info.attention_matmuls, info.attention_scales = "int8", att
    probe = save_deployable(qmodel, tok, PruningConfig(mode="threshold", thresholds=[1.0, 1.0]), info, tmp_path / "probe")
    enc = tok(_mixed_batch(), padding=True, return_tensors="pt", return_token_type_ids=True)
    th, margin = _threshold_away_from_ties(_scores(probe, _feed(enc), 0), enc["attention_mask"].numpy())
    assert margin > 1e-5
    ckpt = save_deployable(qmodel, tok, PruningConfig(mode="threshold", thresholds=[th, 1.0]), info, tmp_path / "ckpt")
    export = export_onnx(ckpt, tmp_path / "onnx", parity_texts=_dev_texts())
    q = json.loads((export / ONNX_CONFIG_FILE).read_text())["quantization"]
    assert q["attention_matmuls"] == "int8" and len(q["int8_attention_gemms"]) == 2 * 2
    texts = _mixed_batch()
    kept7 = _compare(ckpt, export, texts, batch_size=7)
    np.testing.assert_array_equal(kept7, _compare(ckpt, export, texts, batch_size=1))
    assert (kept7[:, 1] < kept7[:, 0]).any()
    nodes = _profile(export, _feed(enc))
    ops = Counter(e["args"]["op_name"] for e in nodes)
    assert ops["MatMulInteger"] == 2 * 2 and ops["MatMulIntegerToFloat"] == 10
    float_mm = [e["name"] for e in nodes if e["args"]["op_name"] in ("MatMul", "FusedMatMul", "Gemm")]
    assert len(float_mm) == 1 and "prune.0.column_sum" in float_mm[0]  # only the scores' column sums
    parity = json.loads((export / MANIFEST_FILE).read_text())["parity"]
    assert parity["argmax_agreement"] == 1.0 and parity["kept_tokens_agreement"] == 1.0
    with pytest.raises(ExportError, match="float only"):  # the fused float Attention op cannot take int8 attention
        export_onnx(ckpt, tmp_path / "fused", attention_op="Attention")


def test_fused_attention_op_equals_the_matmul_subgraph(pruned_exports, tmp_path):
    """The default export (one ONNX `Attention` node per layer in the batch graph, its softmax
    probabilities feeding the scores) and attention_op="MatMul" (the spelled-out subgraph) give the same logits and kept tokens
    in ORT at bs 7 (mixed lengths) and bs 1; an older opset defaults to MatMul; impossible asks fail."""
    import onnx

    ckpt, fused, _ = pruned_exports["bert"]
    plain = export_onnx(ckpt, tmp_path / "matmul", attention_op="MatMul")
    assert json.loads((plain / ONNX_CONFIG_FILE).read_text())["attention_op"] == "MatMul"
    ops_f, ops_p = _branch_ops(onnx.load(str(fused / ONNX_FILE)), "else_branch"), _branch_ops(onnx.load(str(plain / ONNX_FILE)), "else_branch")
    assert ops_f["Attention"] == 2 and "Softmax" not in ops_f
    assert "Attention" not in ops_p and ops_p["Softmax"] == 2
    assert sum(ops_f.values()) < sum(ops_p.values())
    # a batch of one keeps the spelled-out subgraph either way (measured faster there)
    assert _branch_ops(onnx.load(str(fused / ONNX_FILE)), "then_branch") == _branch_ops(onnx.load(str(plain / ONNX_FILE)), "then_branch")
    texts = _mixed_batch()
    for bs in (7, 1):
        a, b = load_onnx(fused, threads=1), load_onnx(plain, threads=1)
        for s in range(0, len(texts), bs):
            enc = a.encode(texts[s:s + bs])
            la, lb = a.logits(enc), b.logits(enc)
            np.testing.assert_allclose(la, lb, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a.last_kept_tokens, b.last_kept_tokens)
    old = export_onnx(ckpt, tmp_path / "opset17", opset=17)
    assert json.loads((old / ONNX_CONFIG_FILE).read_text())["attention_op"] == "MatMul"
    with pytest.raises(ExportError, match="needs opset >= 23"):
        export_onnx(ckpt, tmp_path / "bad", opset=17, attention_op="Attention")
    with pytest.raises(ExportError, match="attention_op 'Flash'"):
        export_onnx(ckpt, tmp_path / "bad", attention_op="Flash")
    assert not (tmp_path / "bad").exists()


def test_deeper_pruned_graph_at_batch_size_one_matches_torch(tmp_path):
    """4 layers, layer 0 keeping every token and layers 1-2 pruning: a batch of one (the `If`'s
    single-sequence branch) over many lengths equals the torch runtime. (With the fused Attention op
    in that branch, position 0 kept by Slice [1:] + Concat made ORT's planner hand layer 1's [T]
    compare the T-1 slice's buffer: a runtime error at every length; 2-layer tests cannot see it.)"""
    from conftest import build_tiny_model

    q = _Quantised(build_tiny_model(tmp_path / "tiny4", "bert", num_layers=4))
    probe = q.checkpoint(PruningConfig(mode="threshold", thresholds=[-1.0, 1.0, 1.0, 1.0]), tmp_path / "probe")
    texts = _dev_texts()[:24]
    enc = q.tok(texts, padding=True, return_tensors="pt", return_token_type_ids=True)
    th, margin = _threshold_away_from_ties(_scores(probe, _feed(enc), 1), enc["attention_mask"].numpy())
    ckpt = q.checkpoint(PruningConfig(mode="threshold", thresholds=[-1.0, th, th, 1.0]), tmp_path / "ckpt")
    export = export_onnx(ckpt, tmp_path / "onnx", parity_texts=texts)
    assert json.loads((export / ONNX_CONFIG_FILE).read_text())["attention_op"] == "Attention"
    kept = _compare(ckpt, export, texts, batch_size=1)
    lengths = enc["attention_mask"].numpy().sum(1)
    assert (kept[:, 1] == lengths).all() and (kept[:, 2] < kept[:, 1]).any() and len(set(lengths)) > 5


def test_gemm_floor_graph_reproduces_the_exports_integer_gemms(pruned_exports, quantised):
    """benchmarks/gemm_floor.py times the export's QuantizeLinear + integer GEMM nodes alone: on the
    activations the pruned graph quantised (captured per batch), its GEMM-only graph must give exactly the
    outputs those GEMM nodes gave inside the graph, hold every integer GEMM of the branch, and see the rows the
    accountant charges (Q/K/V at the tokens entering a layer, the rest at the tokens leaving it)."""
    import importlib.util

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ltp_compress.modeling.onnx_runtime import branch_models

    spec = importlib.util.spec_from_file_location("gemm_floor", REPO / "benchmarks" / "gemm_floor.py")
    gemm_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gemm_floor)

    ckpt, export, _ = pruned_exports["bert"]
    enc = quantised["bert"].tok(_mixed_batch(), padding=True, return_tensors="pt", return_token_type_ids=True)
    om = load_onnx(export)
    om.logits(enc)
    kept = om.last_kept_tokens  # [b, L]
    assert kept[:, 1].sum() < kept[:, 0].sum()  # layer 0 prunes in this batch
    one, many = branch_models(onnx.load(str(export / ONNX_FILE)))
    n0 = int(enc["attention_mask"][0].sum())
    first = {k: v[:1, :n0] for k, v in _feed(enc).items()}  # the first sentence alone, unpadded
    om.logits(first)
    kept_first = om.last_kept_tokens
    # the batch graph: Q, K, V three GEMMs per layer + out proj + 2 FFN, pooler, classifier; batch of one: one QKV GEMM
    for branch, feed, k, n_gemms in ((many, _feed(enc), kept, 2 * 6 + 2), (one, first, kept_first, 2 * 4 + 2)):
        inst, only, parts = gemm_floor.gemm_parts(branch)
        m = onnx.load_from_string(inst)
        gemm_nodes = [x for x in m.graph.node if x.op_type in INT8_OPS]
        assert len(gemm_nodes) == sum(len(kn) for _, _, kn in parts) == n_gemms
        m.graph.output.extend(helper.make_tensor_value_info(x.output[0], TensorProto.FLOAT, None) for x in gemm_nodes)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [x for x, _, _ in parts]
        outs = s.run(names + [x.output[0] for x in gemm_nodes], feed)
        captured, inside = dict(zip(names, outs[:len(names)])), outs[len(names):]
        alone = ort.InferenceSession(only, providers=["CPUExecutionProvider"]).run([x.output[0] for x in gemm_nodes], captured)
        for a, b in zip(alone, inside):
            np.testing.assert_array_equal(a, b)
        rows = {qname: captured[x].shape[0] for x, qname, _ in parts}
        for qname, r in rows.items():
            if ".encoder.layer." not in qname:
                continue
            l = int(qname.split(".encoder.layer.")[1].split(".")[0])
            leaving = k[:, l + 1].sum() if l + 1 < k.shape[1] else k[:, l].sum()
            assert r == (k[:, l].sum() if "attention.self" in qname else leaving), qname


def test_export_never_replaces_a_file_a_foreign_folder_or_a_checkpoint(pruned_exports, tmp_path):
    """The output path: a file, a folder of other files, or a deployable checkpoint is refused before any work and
    left as it was; an empty folder and an earlier export are written / replaced."""
    import shutil

    from ltp_compress.errors import OutputFolderError

    ckpt, export, _ = pruned_exports["bert"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"jpg")
    other_ckpt = tmp_path / "other_ckpt"
    shutil.copytree(ckpt, other_ckpt)
    for out, why in ((a_file, "exists and is not a folder"), (foreign, "a folder of other files"),
                     (other_ckpt, "not a 'ltp-compress-onnx' one")):
        before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
        with pytest.raises(OutputFolderError, match=why):
            export_onnx(ckpt, out)
        assert sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir())) == before
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    export_onnx(ckpt, empty)
    again = tmp_path / "again"
    shutil.copytree(export, again)
    (again / "stale.txt").write_text("x")  # an earlier export (its manifest) is replaced as a whole
    export_onnx(ckpt, again)
    assert (again / ONNX_FILE).is_file() and not (again / "stale.txt").exists()
