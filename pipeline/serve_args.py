"""`ltp-compress serve` options: the one definition of the parser and of the settings it becomes
(`ServeSettings`, pydantic, checked before the model loads). Importing this module is cheap."""

from __future__ import annotations

import argparse
from typing import Literal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ltp_compress.errors import SettingError
from ltp_compress.modeling.runtime_choice import RUNTIMES


class ServeSettings(BaseModel):
    """What `ltp-compress serve` runs with; every limit is enforced before a request reaches the model."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    runtime: Literal[RUNTIMES] = "auto"
    threads: int | None = Field(None, ge=1)
    streams: int = Field(1, ge=1)
    backend: str = "auto"
    task: str | None = None
    max_batch_size: int = Field(32, ge=1, description="texts run as one batch at most")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first text of a batch waits for others")
    bucket_ratio: float = Field(2.0, ge=1.0, description="a batch is cut where the longest text exceeds this times the shortest")
    max_queue: int = Field(256, ge=1, description="texts waiting at most; beyond: 503 with Retry-After")
    max_texts_per_request: int = Field(64, ge=1)
    max_request_bytes: int = Field(1 << 20, ge=64)
    max_text_chars: int = Field(20000, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown: how long accepted requests may take to finish")

    @model_validator(mode="after")
    def _texts_fit_the_queue(self):
        if self.max_texts_per_request > self.max_queue:
            raise ValueError(f"max_texts_per_request ({self.max_texts_per_request}) must be <= max_queue ({self.max_queue})")
        return self


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    d = ServeSettings()
    p = subparsers.add_parser("serve", help="HTTP server (POST /predict, GET /health, /metrics, /model) with dynamic batching")
    p.add_argument("model", type=Path, help="ONNX export folder (onnxruntime) or deployable checkpoint (torch)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--runtime", choices=RUNTIMES, default=d.runtime,
                   help="auto: the table in modeling/runtime_choice.py (onnxruntime for an ONNX export folder; fused for a safetensors checkpoint on an AVX-512 VNNI CPU; else torch)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--streams", type=int, default=d.streams, help="onnxruntime / fused: batches run at once (threads // streams each)")
    p.add_argument("--backend", default=d.backend, help="INT8 GEMM backend of the torch runtime")
    p.add_argument("--task", default=d.task, help="the model's GLUE task, when the checkpoint's run does not say")
    for name in ("max_batch_size", "max_wait_ms", "bucket_ratio", "max_queue", "max_texts_per_request", "max_request_bytes",
                 "max_text_chars", "drain_timeout_s"):
        field = ServeSettings.model_fields[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default,
                       help=(field.description or "") + f" (default {field.default})")
    return p


def settings_from_args(args) -> ServeSettings:
    values = {k: getattr(args, k) for k in ServeSettings.model_fields}
    try:
        return ServeSettings(**values)
    except ValidationError as e:
        msgs = "; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-') or 'settings'}: {err['msg']}" for err in e.errors())
        raise SettingError(f"serve: {msgs}") from None
