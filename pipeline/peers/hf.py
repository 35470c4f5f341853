"""Hugging Face FP32 baselines: the teacher as a plain `AutoModelForSequenceClassification`, with
HF's default attention (sdpa: ``torch.nn.functional.scaled_dot_product_attention``; the baseline)
and with eager attention (what our pipeline trains with)."""

from __future__ import annotations

from ltp_compress.pipeline.peers.common import System, load_teacher

DOCS = "https://huggingface.co/docs/transformers/main/en/perf_infer_cpu"


def _build(inp, attn: str) -> System:
    model = load_teacher(inp, attn)
    return System(lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t).logits,
                  {"api": f"AutoModelForSequenceClassification(attn_implementation='{attn}'), torch.inference_mode()",
                   "settings": {"attn_implementation": model.config._attn_implementation, "dtype": "float32",
                                "torch_threads": inp.threads},
                   "docs": DOCS})


def build_hf_fp32_sdpa(inp) -> System:
    return _build(inp, "sdpa")


def build_hf_fp32_eager(inp) -> System:
    return _build(inp, "eager")
