"""Mixed precision on the CPU (bench/precision.py): what a request becomes is detected and recorded, and bf16
autocast really computes in bf16 where the processor has the instructions."""
from __future__ import annotations

import pytest
import torch

from bench.precision import cpu_bf16_instructions, precision_for


def test_requests_map_to_what_the_device_can_do():
    assert precision_for("no", "cpu").label == "fp32" and precision_for("no", "cpu").autocast_dtype is None
    fp16 = precision_for("fp16", "cpu")
    assert fp16.autocast_dtype is None and fp16.label.startswith("fp32 (fp16 requested")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        precision_for("int8", "cpu")
    bf16 = precision_for("bf16", "cpu")
    if cpu_bf16_instructions():
        assert bf16.label == f"bf16-autocast (cpu, {cpu_bf16_instructions()})" and bf16.dtype == torch.float32
        assert precision_for("bf16-weights", "cpu").dtype == torch.bfloat16
    else:
        assert bf16.autocast_dtype is None and "no bf16 instructions" in bf16.label


@pytest.mark.skipif(not cpu_bf16_instructions(), reason="this CPU has no bf16 instructions (AVX512-BF16/AMX)")
def test_cpu_bf16_autocast_computes_in_bf16_with_fp32_weights():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    prec = precision_for("bf16", "cpu")
    with prec.autocast():
        y = lin(x)
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    ref = lin(x)
    err = (y.float() - ref).abs().max().item()
    assert 1e-5 < err < 0.1  # rounded to bf16 (8 bits of mantissa), not exact
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32
