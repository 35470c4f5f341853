"""What Hugging Face loaders need from an ONNX export folder, checked with transformers itself:
config.json with the labels, tokenizer files that give the ids our runtime feeds the graph, and the
graph's input / output names as optimum's ORTModelForSequenceClassification reads them (inputs
input_ids / attention_mask / token_type_ids, first output `logits`). optimum itself is not tested:
no release installs beside transformers 5.23.0 (optimum-onnx 0.1.0 needs transformers < 4.58,
optimum 1.27 < 4.54; optimum 2.x has no onnxruntime models)."""

from __future__ import annotations

import numpy as np
import pytest

import ltp_compress

from test_serve import build_served_models


@pytest.fixture(scope="module")
def export(tiny_bert, tmp_path_factory):
    return build_served_models(tiny_bert, tmp_path_factory.mktemp("hf"))["sst2"]


def test_export_folder_loads_with_transformers(export):
    import onnx
    from transformers import AutoConfig, AutoTokenizer

    ours = ltp_compress.load(export, threads=1)
    config = AutoConfig.from_pretrained(str(export))
    assert {int(k): v for k, v in config.id2label.items()} == ours.id2label and config.num_labels == ours.num_labels
    tok = AutoTokenizer.from_pretrained(str(export))
    texts = ["a gripping film", "dull, and long, and not funny at all"]
    enc = tok(texts, padding=True, truncation=True, max_length=ours.max_seq_length, return_tensors="np")
    mine = ours.encode(texts)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert np.array_equal(enc[k], mine[k]), k
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert graph.output[0].name == "logits"
