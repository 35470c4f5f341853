"""Deployable INT8 checkpoint (modeling/deploy.py), `ltp-compress predict`, and a tiny end-to-end
recipe finetune -> ltp_soft -> ltp_hard -> distill -> quantize."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ltp_compress
from ltp_compress.kernels import KERNEL_COUNTER, kernel_counters, reset_kernel_counters
from ltp_compress.modeling.deploy import CheckpointError, load_deployable, save_deployable, verify_checkpoint
from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed
from ltp_compress.modeling.quantized import calibrate, convert_to_int8

from conftest import DEMO_DATA, REPO

PRUNING = PruningConfig(mode="threshold", thresholds=[1.0, 1.0])


def _texts(n=32, offset=0):
    lines = (DEMO_DATA / "dev.tsv").read_text().splitlines()[1 + offset:1 + offset + n]
    return [l.split("\t")[0] for l in lines]


def _make_checkpoint(src: Path, dst: Path, backend="auto"):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(src)

    class B:
        pass

    batches = []
    for i in range(0, 32, 16):
        enc = tok(_texts(16, 100 + i), padding=True, return_tensors="pt")
        b = B()
        b.input_ids, b.attention_mask, b.token_type_ids = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
        batches.append(b)
    qmodel, info = convert_to_int8(model, calibrate(model, batches, PRUNING), backend)
    save_deployable(qmodel, tok, PRUNING, info, dst)
    return qmodel, tok


@pytest.fixture(scope="module")
def checkpoint(tiny_bert, tmp_path_factory):
    dst = tmp_path_factory.mktemp("deploy") / "ckpt"
    qmodel, tok = _make_checkpoint(tiny_bert, dst)
    return dst, qmodel, tok


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_save_load_identical_logits(tiny_bert, tiny_roberta, tmp_path, model_type):
    dst = tmp_path / "ckpt"
    qmodel, tok = _make_checkpoint(tiny_bert if model_type == "bert" else tiny_roberta, dst)
    files = {p.name for p in dst.iterdir()}
    assert {"model.safetensors", "config.json", "ltp.json", "manifest.json", "tokenizer.json"} <= files
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # atomic: no leftovers
    ltp = json.loads((dst / "ltp.json").read_text())
    assert ltp["format_version"] == 1 and ltp["pruning"]["thresholds"] == [1.0, 1.0]
    assert ltp["quantization"]["attention_matmuls"] == "fp32" and len(ltp["quantization"]["int8_layers"]) == 14
    dm = ltp_compress.load(dst, runtime="torch")
    enc = tok(_texts(), padding=True, return_tensors="pt")
    expected = forward_packed(qmodel, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), PRUNING).logits
    reset_kernel_counters()
    got = dm.logits(enc)
    assert torch.equal(got, expected)  # bit-identical
    assert sum(kernel_counters().values()) == 14
    assert dm.backend == "reference" or "reference" not in kernel_counters()
    assert int(dm.last_kept_tokens[:, -1].sum()) < int(enc["attention_mask"].sum())  # tokens removed
    # int8 weights on disk
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        name = ltp["quantization"]["int8_layers"][0]
        assert f.get_tensor(f"{name}.w_q").dtype == torch.int8
        assert f.get_tensor(f"{name}.x_scale").ndim == 0


def test_predict_api_and_reference_backend(checkpoint):
    dst, qmodel, tok = checkpoint
    dm = load_deployable(dst, backend="reference")
    texts = _texts(10)
    res = dm.predict(texts, batch_size=3)
    assert len(res) == 10 and all(set(r) == {"label", "score"} and 0.5 <= r["score"] <= 1.0 for r in res)
    # order is kept although batches are length-sorted
    single = [dm.predict([t])[0] for t in texts[:3]]
    for a, b in zip(single, res[:3]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert dm.predict([]) == []
    pair = dm.predict(["a good movie"], ["really"])
    assert len(pair) == 1


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing", "manifest_edit", "manifest_drop", "extra", "no_manifest", "bad_manifest_json"])
def test_corrupted_checkpoint_refused(checkpoint, tmp_path, damage):
    src = checkpoint[0]
    d = _corrupt_copy(src, tmp_path / "c")
    w = d / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
        expect = ("model.safetensors", "truncated")
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x01
        w.write_bytes(bytes(data))
        expect = ("model.safetensors", "sha256")
    elif damage == "missing":
        (d / "tokenizer.json").unlink()
        expect = ("tokenizer.json", "missing")
    elif damage == "manifest_edit":
        m = json.loads((d / "manifest.json").read_text())
        m["files"]["ltp.json"]["sha256"] = "0" * 64
        (d / "manifest.json").write_text(json.dumps(m))
        expect = ("ltp.json", "sha256")
    elif damage == "manifest_drop":
        m = json.loads((d / "manifest.json").read_text())
        del m["files"]["config.json"]
        (d / "manifest.json").write_text(json.dumps(m))
        expect = ("config.json", "not listed")
    elif damage == "extra":
        (d / "evil.safetensors").write_bytes(b"x")
        expect = ("evil.safetensors", "not listed")
    elif damage == "no_manifest":
        (d / "manifest.json").unlink()
        expect = ("manifest.json", "missing")
    else:
        (d / "manifest.json").write_text("{not json")
        expect = ("manifest.json", "malformed")
    with pytest.raises(CheckpointError) as ei:
        load_deployable(d)
    msg = str(ei.value)
    assert expect[0] in msg and expect[1] in msg, msg
    # the CLI prints it as a one-paragraph error, exit code 2
    from ltp_compress.pipeline.cli import main

    assert main(["predict", str(d), "a fine film"]) == 2
    verify_checkpoint(src)  # the original is intact


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint whose ltp.json went through `edit(ltp dict)`, with a consistent manifest
    (only the content is wrong, or old)."""
    from ltp_compress.manifest import write_manifest
    from ltp_compress.modeling.checkpoint_format import FORMAT, FORMAT_VERSION

    shutil.copytree(src, dst)
    ltp = json.loads((dst / "ltp.json").read_text())
    edit(ltp)
    (dst / "ltp.json").write_text(json.dumps(ltp, indent=2))
    write_manifest(dst, FORMAT, FORMAT_VERSION)
    return dst


@pytest.mark.parametrize("damage,field", [
    ("unknown_top", "colour"), ("unknown_quantization", "quantization.observer_kind"),
    ("wrong_type", "max_seq_length"), ("wrong_list", "quantization.int8_layers"), ("missing", "quantization.int8_layers"),
    ("attention", "quantization.attention_matmuls"),
])
def test_ltp_json_unknown_field_or_wrong_type_refused(checkpoint, tmp_path, damage, field):
    """The typed reader of ltp.json (checkpoint_format.CheckpointInfo): an unknown key, a wrong type or a
    missing required key is a CheckpointError naming ltp.json and the field, for the torch loader, the
    exporter and the CLI alike."""
    from ltp_compress.modeling.onnx_export import ExportError, export_onnx

    def edit(ltp):
        q = ltp["quantization"]
        if damage == "unknown_top":
            ltp["colour"] = "blue"
        elif damage == "unknown_quantization":
            q["observer_kind"] = "minmax"
        elif damage == "wrong_type":
            ltp["max_seq_length"] = "long"
        elif damage == "wrong_list":
            q["int8_layers"] = "bert.encoder.layer.0.attention.self.query"
        elif damage == "missing":
            del q["int8_layers"]
        else:
            q["attention_matmuls"] = "int4"

    d = _edited_copy(checkpoint[0], tmp_path / "c", edit)
    with pytest.raises(CheckpointError) as ei:
        load_deployable(d)
    assert f"{d / 'ltp.json'}: " in str(ei.value) and f"'{field}'" in str(ei.value), str(ei.value)
    with pytest.raises(ExportError) as ei:
        export_onnx(d, tmp_path / "onnx")
    assert "ltp.json" in str(ei.value) and f"'{field}'" in str(ei.value), str(ei.value)
    from ltp_compress.pipeline.cli import main

    assert main(["predict", str(d), "a fine film"]) == 2


def test_new_checkpoint_stores_activation_scales_once(checkpoint):
    """The activation scales live in model.safetensors (`<linear>.x_scale`) only; ltp.json lists the layers."""
    from safetensors import safe_open

    dst, qmodel, _ = checkpoint
    ltp = json.loads((dst / "ltp.json").read_text())
    assert "act_scales" not in ltp["quantization"]
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        stored = {n: float(f.get_tensor(f"{n}.x_scale")) for n in ltp["quantization"]["int8_layers"]}
    assert stored == {n: float(qmodel.get_submodule(n).x_scale) for n in stored} and len(stored) == 14


def test_older_checkpoint_with_both_scale_copies_loads_and_exports_the_same_graph(checkpoint, tmp_path):
    """A checkpoint written before the scales were stored once (ltp.json quantization.act_scales beside the
    x_scale tensors; one written between the activation_range setting and 523929d also has
    activation_qmin) loads with the same logits and exports the byte-identical graph; copies that
    disagree are refused, naming both."""
    from safetensors import safe_open

    from ltp_compress.modeling.onnx_export import ONNX_FILE, ExportError, export_onnx

    src = checkpoint[0]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        names = json.loads((src / "ltp.json").read_text())["quantization"]["int8_layers"]
        # the calibrated value (float64) the old writer put in ltp.json; its float32 rounding is the tensor
        scales = {n: float(f.get_tensor(f"{n}.x_scale").double()) * (1 + 2 ** -30) for n in names}

    def old(ltp):
        ltp["quantization"]["act_scales"] = scales
        ltp["quantization"]["activation_qmin"] = -128

    legacy = _edited_copy(src, tmp_path / "legacy", old)
    enc = load_deployable(src).encode(_texts())
    assert torch.equal(load_deployable(legacy).logits(enc), load_deployable(src).logits(enc))
    a, b = export_onnx(src, tmp_path / "onnx_new"), export_onnx(legacy, tmp_path / "onnx_legacy")
    assert (a / ONNX_FILE).read_bytes() == (b / ONNX_FILE).read_bytes()

    bad_name = names[3]
    bad = _edited_copy(legacy, tmp_path / "bad", lambda ltp: ltp["quantization"]["act_scales"].update({bad_name: scales[bad_name] * 2}))
    with pytest.raises(CheckpointError) as ei:
        load_deployable(bad)
    msg = str(ei.value)
    assert "ltp.json" in msg and f"'quantization.act_scales.{bad_name}'" in msg and f"'{bad_name}.x_scale'" in msg, msg
    with pytest.raises(ExportError, match=rf"act_scales\.{bad_name}.*disagree"):
        export_onnx(bad, tmp_path / "onnx_bad")


def test_predict_cli_inputs(checkpoint, tmp_path, capsys, monkeypatch):
    from ltp_compress.pipeline.cli import main

    dst = checkpoint[0]
    assert main(["predict", str(dst), "a fine film", "boring ||| and long", "--batch-size", "2", "--runtime", "torch"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("boring ||| and long")
    label, score, text = lines[0].split("\t")
    assert text == "a fine film" and 0.5 <= float(score) <= 1.0
    assert "int8 backend" in err and "kernels run" in err
    # TSV: GLUE header 'sentence<TAB>label' skipped, label column not taken as text_b
    tsv = tmp_path / "in.tsv"
    tsv.write_text("sentence\tlabel\nthe best\t1\nthe worst\t0\n")
    assert main(["predict", str(dst), "--tsv", str(tsv)]) == 0
    out, _ = capsys.readouterr()
    assert [l.split("\t")[2] for l in out.strip().splitlines()] == ["the best", "the worst"]
    # stdin
    monkeypatch.setattr(sys, "stdin", io.StringIO("one line\n\nsecond line\n"))
    assert main(["predict", str(dst)]) == 0
    out, _ = capsys.readouterr()
    assert len(out.strip().splitlines()) == 2
    # --streams is an onnxruntime / fused setting: the torch runtime refuses it with a clear error
    assert main(["predict", str(dst), "a fine film", "--streams", "2", "--runtime", "torch"]) == 2
    assert "streams" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_recipe_then_predict(tiny_bert, tmp_path, capsys):
    from ltp_compress.pipeline.cli import main
    from ltp_compress.pipeline.runner import run_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: e2e
model: {tiny_bert}
task: sst2
output_dir: {tmp_path / 'runs'}
data: {{source: glue_dir, path: {REPO / 'data' / 'sst2_demo'}, max_train_examples: 128, max_dev_examples: 64}}
stages:
  - {{id: teacher, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}}
  - {{id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, lr: 1.0e-3, final_threshold: 1.0}}
  - {{id: hard, stage: ltp_hard, epochs: 1, batch_size: 16, lr: 1.0e-3, kd_teacher: teacher}}
  - {{id: kd, stage: distill, kd_teacher: teacher, epochs: 1, batch_size: 16, lr: 1.0e-3, quant_aware: true}}
  - {{id: int8, stage: quantize, calibration_batches: 4, calibration_batch_size: 16, observer: percentile, percentile: 99.9}}
""")
    run_dir = run_recipe(recipe, progress=False)
    meta = json.loads((run_dir / "stages" / "04-int8" / "meta.json").read_text())
    extra = meta["extra"]
    ckpt = Path(extra["deploy_dir"])
    assert ckpt == run_dir / "stages" / "04-int8" / "model" and (ckpt / "manifest.json").is_file()
    kernel = KERNEL_COUNTER[extra["kernel"]["backend"]]
    assert extra["kernel"]["counters"].get(kernel, 0) > 0  # the real INT8 kernel ran during evaluation
    assert meta["cost"]["precision"]["qkv_proj"] == [8, 8] and meta["cost"]["precision"]["attn_scores"] == [32, 32]
    kd_meta = json.loads((run_dir / "stages" / "03-kd" / "meta.json").read_text())
    # int8 Linear weights on disk (the tiny model is dominated by its float embeddings)
    assert meta["model_size_bytes"] < kd_meta["model_size_bytes"]
    assert (run_dir / "stages" / "03-kd" / "model" / "act_scales.json").is_file()
    capsys.readouterr()
    assert main(["predict", str(ckpt), "a gorgeous , witty film", "a dull mess"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("negative", "positive")
    # runtime "auto": the table's row is printed; the torch runtime names its kernels, the fused one its GEMM
    assert "runtime choice: auto: deployable checkpoint" in err
    assert "kernels run" in err or ("runtime: fused" in err and "vpdpbusd" in err), err
