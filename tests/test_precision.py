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
        assert bf16.label == f"bf16-autocast (cpu, {cpu_bf16_instructions()}; attention fp32)"
        assert bf16.dtype == torch.float32 and bf16.fp32_attention
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


@pytest.mark.skipif(not cpu_bf16_instructions(), reason="this CPU has no bf16 instructions (AVX512-BF16/AMX)")
def test_cpu_bf16_autocast_computes_attention_in_fp32_and_restores_it():
    """The CPU's bf16 flash-attention backward is slow (bench/precision.py): inside the context attention is fp32 on
    the bf16 projections (exactly), its gradient too; the context is reusable and puts the function back, also after
    an error."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 8, generator=gen) for _ in range(3))
    lin = torch.nn.Linear(8, 8)
    ctx = precision_for("bf16", "cpu").autocast()
    for _ in range(2):  # reusable, like torch.autocast
        with ctx:
            qb = lin(q)  # bf16 under autocast
            assert qb.dtype == torch.bfloat16 and F.scaled_dot_product_attention is not original
            out = F.scaled_dot_product_attention(qb, k, v)
        assert F.scaled_dot_product_attention is original
        expected = original(qb.float(), k, v).to(torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = original(qb, k, v)  # autocast's own bf16 attention rounds the keys/values too
        assert not torch.equal(out, plain)
    out.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    with pytest.raises(RuntimeError, match="inside"):
        with ctx:
            raise RuntimeError("inside")
    assert F.scaled_dot_product_attention is original


def test_a_mixed_precision_request_puts_the_precision_policy_in_the_stage_key():
    """What a request computes can change with the policy (bench/precision.py POLICY_VERSION), so a stage requesting
    mixed precision is keyed by it; a stage in fp32 keeps its key."""
    from bench.planner import plugin_spec
    from bench.plugins import DEFENSES
    from bench.precision import POLICY_VERSION
    from bench.registry import build_params
    from bench.suites import Entry

    cls = DEFENSES.get("aspl")

    def spec(precision: str) -> dict:
        params = build_params(cls, {"mixed_precision": precision}, "tiny", "aspl")
        return plugin_spec(Entry("defense", "aspl", "aspl", params, cls, {}))

    assert spec("bf16")["precision_policy"] == POLICY_VERSION
    assert "precision_policy" not in spec("no")
