"""Hugging Face baselines: the teacher as a plain `AutoModelForSequenceClassification`, with
HF's default attention (sdpa: ``torch.nn.functional.scaled_dot_product_attention``; the baseline)
and with eager attention (what our pipeline trains with), in FP32, and in bf16 as a user gets it
with ``model.to(torch.bfloat16)``."""

from __future__ import annotations

from ltp_compress.pipeline.peers.common import System, load_teacher

DOCS = "https://huggingface.co/docs/transformers/main/en/perf_infer_cpu"


def _build(inp, attn: str, dtype: str = "float32") -> System:
    import torch

    model = load_teacher(inp, attn).to(getattr(torch, dtype))
    return System(lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t).logits.float(),
                  {"api": f"AutoModelForSequenceClassification(attn_implementation='{attn}')"
                          + (f".to(torch.{dtype})" if dtype != "float32" else "") + ", torch.inference_mode()",
                   "settings": {"attn_implementation": model.config._attn_implementation, "dtype": dtype,
                                "torch_threads": inp.threads},
                   "docs": DOCS})


def build_hf_fp32_sdpa(inp) -> System:
    return _build(inp, "sdpa")


def build_hf_fp32_eager(inp) -> System:
    return _build(inp, "eager")


def build_hf_bf16_sdpa(inp) -> System:
    """What a user gets from `model.to(torch.bfloat16)`: oneDNN's bf16 kernels (AMX where the CPU has amx_bf16,
    AVX-512 BF16 otherwise, or a slow emulation without either: the environment block says which CPU)."""
    return _build(inp, "sdpa", "bfloat16")
