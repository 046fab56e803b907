"""Mixed precision for the training and PGD loops of defenses and attacks, on CUDA and on the CPU.

``mixed_precision`` is a plug-in parameter ("no", "bf16", "fp16", and Anti-DreamBooth's "bf16-weights"); what a
request becomes depends on the device, and the label saying so is recorded with the stage (the leaderboard row's
provenance):
- CUDA: bf16 or fp16 autocast over fp32 weights (fp16 with a gradient scaler), or bf16 weights.
- CPU: bf16 autocast where the processor has bf16 instructions (AVX512-BF16 or AMX, detected by torch), with
  attention (``F.scaled_dot_product_attention``, diffusers' and transformers' attention) computed in fp32: torch's CPU
  bf16 flash-attention backward is slower than its fp32 one (medium-scale PGD step, one thread: plain bf16 autocast
  0.50 s, fp32 0.54 s, bf16 with fp32 attention 0.40 s; benchmarks/step_profile.py); fp32 where the processor lacks
  bf16 instructions, and for fp16 (no fast fp16 matmul on CPUs). Weights stay fp32 under autocast, as on CUDA.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from bench.lazy import lazy_import

torch = lazy_import("torch")

PRECISIONS = ("no", "bf16", "fp16", "bf16-weights")
# In the key of every stage whose plug-in requests mixed precision (bench/planner.py plugin_spec): bump it when what a
# request computes changes. 2: CPU bf16 autocast computes attention in fp32.
POLICY_VERSION = 2


def cpu_bf16_instructions() -> str:
    """The processor's bf16 instruction set torch can use ("amx", "avx512_bf16"), or "" where it has none."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else ""


def _fp32_sdpa(inner, query, key, value, attn_mask=None, *args, **kwargs):
    """``inner`` (scaled_dot_product_attention) in fp32 with autocast off; the result in the query's dtype."""
    with torch.autocast("cpu", enabled=False):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        return inner(query.float(), key.float(), value.float(), attn_mask, *args, **kwargs).to(query.dtype)


class _AutocastFP32Attention:
    """CPU bf16 autocast during which ``torch.nn.functional.scaled_dot_product_attention`` runs in fp32 (reusable and
    nestable like ``torch.autocast``; the function is restored on exit, also on errors)."""

    def __init__(self, dtype) -> None:
        self.dtype = dtype
        self._stack: list[tuple[Any, Any]] = []

    def __enter__(self):
        fn = torch.nn.functional
        ac = torch.autocast("cpu", dtype=self.dtype)
        self._stack.append((fn.scaled_dot_product_attention, ac))
        fn.scaled_dot_product_attention = functools.partial(_fp32_sdpa, fn.scaled_dot_product_attention)
        return ac.__enter__()

    def __exit__(self, *exc) -> None:
        inner, ac = self._stack.pop()
        try:
            ac.__exit__(*exc)
        finally:
            torch.nn.functional.scaled_dot_product_attention = inner


@dataclass(frozen=True)
class Precision:
    label: str  # what was used, recorded with the stage
    device_type: str  # "cuda" or "cpu"
    autocast_dtype: Any = None  # None: no autocast
    weights_dtype: Any = None  # None: fp32
    scaler: Any = None  # fp16 on CUDA
    fp32_attention: bool = False  # CPU bf16 autocast: attention in fp32 (module docstring)

    def autocast(self):
        """A fresh autocast context (or a null one)."""
        if self.autocast_dtype is None:
            return nullcontext()
        if self.fp32_attention:
            return _AutocastFP32Attention(self.autocast_dtype)
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    @property
    def dtype(self):
        return self.weights_dtype or torch.float32


def precision_for(requested: str, device: str) -> Precision:
    """What ``mixed_precision=requested`` means on ``device`` (see the module docstring)."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {requested!r}")
    if requested == "no":
        return Precision("fp32", device.split(":")[0])
    if device.startswith("cuda"):
        if requested == "bf16":
            return Precision("bf16-autocast", "cuda", torch.bfloat16)
        if requested == "fp16":
            return Precision("fp16-autocast+grad-scaler", "cuda", torch.float16, scaler=torch.amp.GradScaler("cuda"))
        return Precision("bf16-weights", "cuda", weights_dtype=torch.bfloat16)
    isa = cpu_bf16_instructions()
    if requested == "fp16" or not isa:
        why = "no fast fp16 on CPUs" if requested == "fp16" else "this CPU has no bf16 instructions (AVX512-BF16/AMX)"
        return Precision(f"fp32 ({requested} requested; {why})", "cpu")
    if requested == "bf16":
        return Precision(f"bf16-autocast (cpu, {isa}; attention fp32)", "cpu", torch.bfloat16, fp32_attention=True)
    return Precision(f"bf16-weights (cpu, {isa})", "cpu", weights_dtype=torch.bfloat16)


def autocast_for(requested: str, device: str) -> tuple[Any, str]:
    """(autocast context, label) of ``precision_for``, for loops that need nothing else of it."""
    prec = precision_for(requested, device)
    return prec.autocast(), prec.label
