"""Dense INT8 peers in PyTorch: ``torch.ao`` dynamic quantisation, Intel Neural Compressor 3.x PT2E
static INT8 + ``torch.compile`` (inductor freezing), torchao static W8A8 + ``torch.compile``."""

from __future__ import annotations

from ltp_compress.pipeline.peers.common import System, hf_logits_module, load_teacher, pad_to_multiple, version


def build_torch_dynamic_int8(inp) -> System:
    import torch

    qd = getattr(getattr(torch, "ao", None), "quantization", None)
    qd = getattr(qd, "quantize_dynamic", None)
    if qd is None:
        raise RuntimeError("torch.ao.quantization.quantize_dynamic is not available in this torch")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qd(load_teacher(inp, "sdpa"), {torch.nn.Linear}, dtype=torch.qint8)
    return System(lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t).logits,
                  {"api": "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)",
                   "settings": {"dtype": "qint8", "modules": "nn.Linear", "attn_implementation": "sdpa",
                                "quantized_engine": torch.backends.quantized.engine},
                   "docs": "https://pytorch.org/tutorials/intermediate/dynamic_quantization_bert_tutorial.html"})


def linear_amax(model, batches) -> dict[str, tuple[float, int]]:
    """{linear name: (max |x| over the calibration batches, input ndim)} through the HF forward."""
    import torch

    amax: dict[str, tuple[float, int]] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(mod, args, _n=n):
                x = args[0]
                prev = amax.get(_n, (0.0, x.ndim))[0]
                amax[_n] = (max(prev, float(x.detach().abs().max())) if x.numel() else prev, x.ndim)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids)
    finally:
        for h in hooks:
            h.remove()
    return amax


def build_inc_static_int8(inp) -> System:
    import torch
    import torch._dynamo

    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import convert, get_default_static_config, prepare

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # X86InductorQuantizer's qdq patterns are lowered to oneDNN int8 kernels only with freezing on
    # (as in INC's PT2E examples); without it the compiled graph runs dequantise + FP32 linear
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    teacher = load_teacher(inp)
    wrapped = hf_logits_module(teacher)
    first = inp.calibration[0]
    example = (first.input_ids, first.attention_mask, first.token_type_ids)
    max_seq = min(int(inp.max_seq_length), int(getattr(teacher.config, "max_position_embeddings", 512)))
    notes = []
    pad_multiple = None
    try:
        batch_dim = torch.export.Dim("batch", min=1, max=4096)
        seq_dim = torch.export.Dim("seq", min=2, max=max_seq)
        dyn = {k: {0: batch_dim, 1: seq_dim} for k in ("input_ids", "attention_mask", "token_type_ids")}
        exported = export(wrapped, example, dynamic_shapes=dyn)
        shapes = "dynamic batch and sequence dims (torch.export.Dim)"
    except Exception as e:  # fall back: bucket the sequence length, static export per bucket is not attempted
        notes.append(f"dynamic export failed ({type(e).__name__}: {str(e)[:200]}); exported with dynamic batch only, inputs padded to multiples of 16")
        pad_multiple = 16
        batch_dim = torch.export.Dim("batch", min=1, max=4096)
        seq_dim = torch.export.Dim("seq16", min=1, max=max(1, max_seq // 16)) * 16
        dyn = {k: {0: batch_dim, 1: seq_dim} for k in ("input_ids", "attention_mask", "token_type_ids")}
        ex = pad_to_multiple(*example, 16, inp.pad_token_id)
        exported = export(wrapped, ex, dynamic_shapes=dyn)
        shapes = "dynamic batch, sequence padded to multiples of 16"
    prepared = prepare(exported, get_default_static_config())
    with torch.no_grad():
        for b in inp.calibration:
            args = (b.input_ids, b.attention_mask, b.token_type_ids)
            if pad_multiple:
                args = pad_to_multiple(*args, pad_multiple, inp.pad_token_id)
            prepared(*args)
    q = convert(prepared)
    compiled = torch.compile(q, dynamic=True)
    return System(lambda i, m, t: compiled(i, m, t),
                  {"api": "neural_compressor.torch.export.export(dynamic_shapes) -> prepare(get_default_static_config()) -> "
                          "calibrate -> convert -> torch._inductor.config.freezing = True; torch.compile(dynamic=True)",
                   "settings": {"config": "get_default_static_config()", "inductor_freezing": True, "compile_dynamic": True,
                                "calibration_batches": len(inp.calibration)},
                   "docs": "https://github.com/intel/neural-compressor/blob/master/docs/source/3x/PT_StaticQuant.md",
                   "shapes": shapes, "notes": notes, "pad_token_id": inp.pad_token_id,
                   "inc_version": version("neural-compressor")}, pad_multiple=pad_multiple)


def build_torchao_static_int8_compiled(inp) -> System:
    import torch
    import torch._dynamo

    from torchao.quantization import Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # torchao's CPU int8 recipes lower to oneDNN int8 with freezing on
    model = load_teacher(inp)
    amax = linear_amax(model, inp.calibration)
    for n, (a, ndim) in amax.items():
        scale = torch.full([1] * ndim, (a / 127.0) if a > 0 else 1.0, dtype=torch.float32)
        cfg = Int8StaticActivationInt8WeightConfig(act_quant_scale=scale, granularity=[PerTensor(), PerRow()],
                                                   act_mapping_type=MappingType.SYMMETRIC)
        quantize_(model, cfg, filter_fn=lambda mod, fqn, _n=n: fqn == _n)
    wrapped = hf_logits_module(model)
    compiled = torch.compile(wrapped, dynamic=True)
    return System(lambda i, m, t: compiled(i, m, t),
                  {"api": "torchao.quantization.quantize_(model, Int8StaticActivationInt8WeightConfig(act_quant_scale=max|x|/127 "
                          "per Linear, granularity=[PerTensor(), PerRow()], act_mapping_type=SYMMETRIC), filter_fn=that Linear) "
                          "-> torch._inductor.config.freezing = True; torch.compile(dynamic=True)",
                   "settings": {"granularity": "[PerTensor(), PerRow()]", "act_mapping_type": "SYMMETRIC",
                                "inductor_freezing": True, "compile_dynamic": True},
                   "docs": "https://docs.pytorch.org/ao/stable/quick_start.html",
                   "calibration": "max |x| per Linear input over the calibration batches (HF forward)",
                   "linears_quantized": len(amax), "torchao_version": version("torchao")})
