"""ASPL (defenses/anti_dreambooth.py) memory and speed: measured on CPU at tiny and medium scale, estimated for the
paper profile (SD2.1-base, 512 px) on a GPU.

    .venv/bin/python benchmarks/aspl_memory.py [--sizes tiny medium] [--rounds 2] [--configs ...] [--repeat 1]
                                               [--estimate-only]

Measured part: each configuration runs ASPL (``rounds`` x (3 surrogate, 6 PGD, 3 training steps), prior preservation
with 2 class images) in a fresh subprocess, so peak RSS belongs to that run alone; reported as wall time of the loop,
peak RSS, and the RSS growth during the loop (peak minus RSS when the first surrogate starts), each as a ratio to
the straightforward implementation in the same precision (``naive``: the reference's deep copy of UNet + text
encoder each round, prompts re-encoded at every step, parameter gradients computed during PGD, and torch's default
AdamW, a for-loop over the parameters on CPU, where the project uses the fused kernel). Sizes: ``tiny`` = tiny:a
(UNet (32, 64), 64 px); ``medium`` = an SD-shaped UNet (64, 128, 256), 128 px, untrained weights (timing only).

Estimated part: the GPU memory of ASPL at the paper profile, from the parameter counts of SD2.1-base's UNet / text
encoder / VAE and from the activations that autograd saves, counted exactly by running the real diffusers and
transformers modules on PyTorch's ``meta`` device (no memory is allocated) with flash-style attention (saves q, k,
v, output and log-sum-exp, as PyTorch's SDPA flash / memory-efficient kernels do on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 2**30
CONFIGS = {  # name -> (defense, params, loop options)
    "naive": ("aspl", {}, "NAIVE"),
    "efficient": ("aspl", {}, "default"),
    "efficient+ckpt+pgd_bs1": ("aspl", {"gradient_checkpointing": True, "pgd_batch_size": 1}, "default"),
    "lora-surrogate": ("aspl", {"lora_surrogate": True}, "default"),
    # CPU mixed precision (bench/precision.py: bf16 autocast where the CPU has AVX512-BF16/AMX), against naive in bf16
    "naive bf16": ("aspl", {"mixed_precision": "bf16"}, "NAIVE"),
    "efficient bf16": ("aspl", {"mixed_precision": "bf16"}, "default"),
}


# ----------------------------------------------------------------------------------------------- measured (CPU)

def _rss_bytes() -> int:
    import psutil  # installed with accelerate

    return psutil.Process().memory_info().rss


def _medium_variant() -> None:
    """Register the medium SD-shaped variant (UNet (64, 128, 256), 128 px) in this process."""
    from bench import models

    models.TINY_VARIANTS["medium"] = models.TinyVariant(
        unet_channels=(64, 128, 256), unet_groups=32, unet_layers=2, head_dim=8, text_hidden=64, text_layers=2,
        vae_channels=(32, 64, 64, 64), seed_offset=11)


def _medium_model(folder: Path) -> None:
    from bench import models

    _medium_variant()
    models.prepare_tiny("medium", folder, {"vae_steps": 0, "unet_steps": 0}, seed=0, resolution=128)


def child(size: str, config: str, model_dir: Path, rounds: int) -> dict:
    """One ASPL run; prints a JSON line with wall time and memory."""
    import torch

    torch.set_num_threads(1)
    import defenses.anti_dreambooth as ad
    from bench.datasets import SyntheticDataset
    from bench.plugins import DEFENSES, RunContext
    from bench.registry import build_params

    res = 64 if size == "tiny" else 128
    name, params, opts = CONFIGS[config]
    cls = DEFENSES.get(name)
    d = cls(build_params(cls, {**params, "rounds": rounds, "num_class_images": 2}, "tiny", name))
    if opts == "NAIVE":
        d.loop_options = ad.NAIVE
        # the reference's optimizer: torch.optim.AdamW with its defaults (a for-loop over the parameters on CPU)
        ad.adamw = lambda params, **kw: torch.optim.AdamW(list(params), **kw)
    marks: dict[str, float] = {}
    begin = ad._Engine.begin_surrogate

    def marked(self, *a, **k):
        marks.setdefault("loop_start", time.perf_counter())
        marks.setdefault("cpu_start", time.process_time())
        marks.setdefault("rss_at_loop_start", _rss_bytes())
        return begin(self, *a, **k)

    ad._Engine.begin_surrogate = marked
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), _rss_bytes()))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    subject = SyntheticDataset().subjects(None)[0]
    ctx = RunContext(seed=0, device="cpu", profile="tiny", resolution=res, work_dir=Path("."),
                     models={"default": model_dir})
    d.protect(ctx, subject.load("B", res), subject, model_dir)
    end, cpu_end = time.perf_counter(), time.process_time()
    stop.set()
    thread.join()
    loop = [r for t, r in samples if t >= marks["loop_start"]]
    unet = d.models[0].comps.unet
    return {"size": size, "config": config, "loop_wall_s": end - marks["loop_start"],
            "loop_cpu_s": cpu_end - marks["cpu_start"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            "loop_rss_growth_gb": (max(loop) - marks["rss_at_loop_start"]) / GB if loop else float("nan"),
            "unet_params_m": sum(q.numel() for q in unet.parameters()) / 1e6,
            "trainable_params_m": sum(q.numel() for q in d.models[0].trainable) / 1e6,
            "step_counts": ctx.extra["step_counts"], "precision": ctx.extra["precision"]}


def measure(sizes: list[str], rounds: int, configs: list[str], repeat: int = 1) -> list[dict]:
    """Each configuration in a fresh subprocess; with ``repeat`` > 1 the configurations are interleaved and the
    fastest loop (CPU time) of each is kept (other load on the machine only slows runs down)."""
    from bench.models import prepare_tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / size
            if size == "tiny":
                prepare_tiny("a", folder, {}, seed=0)
            else:
                _medium_model(folder)
            best: dict[str, dict] = {}
            for _ in range(repeat):
                for config in configs:
                    cmd = [sys.executable, __file__, "--child", size, config, str(folder), str(rounds)]
                    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
                    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                    if out.returncode or not line:
                        raise RuntimeError(f"{size}/{config} failed:\n{out.stderr[-3000:]}")
                    row = json.loads(line[-1])
                    print(f"  measured {size:6s} {config:24s} loop {row['loop_wall_s']:.1f} s wall, {row['loop_cpu_s']:.1f} "
                          f"s CPU ({row['precision']})", flush=True)
                    if config not in best or row["loop_cpu_s"] < best[config]["loop_cpu_s"]:
                        best[config] = row
            rows.extend(best[c] for c in configs)
    return rows


def print_measured(rows: list[dict]) -> None:
    print("\nMeasured on CPU (1 thread), ASPL rounds x (3, 6, 3), ratios to `naive` in the same precision:")
    print("(loop s: the process's CPU time, one thread: other load on the machine does not inflate it as it does wall "
          "time)")
    print(f"{'size':7s} {'config':24s} {'UNet M':>7s} {'train M':>8s} {'loop s':>8s} {'x':>6s} {'peak RSS GB':>12s} "
          f"{'x':>6s} {'loop RSS +GB':>13s} {'x':>6s}")
    for size in dict.fromkeys(r["size"] for r in rows):
        for r in (r for r in rows if r["size"] == size):
            same = "naive bf16" if r["config"].endswith(" bf16") else "naive"
            base = next((b for b in rows if b["size"] == size and b["config"] == same), r)
            print(f"{size:7s} {r['config']:24s} {r['unet_params_m']:7.2f} {r['trainable_params_m']:8.2f} "
                  f"{r['loop_cpu_s']:8.2f} {r['loop_cpu_s'] / base['loop_cpu_s']:6.2f} {r['peak_rss_gb']:12.3f} "
                  f"{r['peak_rss_gb'] / base['peak_rss_gb']:6.2f} {r['loop_rss_growth_gb']:13.3f} "
                  f"{r['loop_rss_growth_gb'] / max(base['loop_rss_growth_gb'], 1e-9):6.2f}")


# ----------------------------------------------------------------------------------------------- estimated (GPU)

def _sd21_base_modules():
    """SD2.1-base's UNet, OpenCLIP-H text encoder (23 layers) and KL-f8 VAE, on the meta device (configs as published
    in stabilityai/stable-diffusion-2-1-base; parameter counts checked against 865M / 340M / 84M)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                          projection_dim=512, hidden_act="gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, sample_size=512)
    return unet, te, vae


def _flash_sdpa():
    """A stand-in for F.scaled_dot_product_attention that saves what the CUDA flash kernel saves."""
    import torch

    math_sdpa = torch.nn.functional.scaled_dot_product_attention

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask, causal):
            out = math_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
            lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: shapes only
            raise NotImplementedError

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return Flash.apply(q, k, v, attn_mask, is_causal)

    return sdpa


def saved_activation_bytes(fn, units: tuple[type, ...] = (), modules=()) -> tuple[int, dict[str, int]]:
    """Bytes autograd keeps for backward while ``fn`` runs (storages deduplicated), and per checkpointable unit: the
    largest single unit's own saved bytes and the bytes of all units' inputs (kept alive under checkpointing)."""
    import torch

    seen: dict[int, int] = {}
    stack: list[int] = []
    per_unit: dict[int, int] = {}
    inputs = [0]

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen[st._cdata] = st.nbytes()
            if stack:
                per_unit[stack[-1]] = per_unit.get(stack[-1], 0) + st.nbytes()
        return t

    hooks = []
    for mod in modules:
        for sub in mod.modules():
            if isinstance(sub, units):
                def pre(m, args, kwargs, _id=id(sub)):
                    if not stack:
                        inputs[0] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
                    stack.append(_id)

                def post(m, args, kwargs, out):
                    stack.pop()

                hooks.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
                hooks.append(sub.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in hooks:
            h.remove()
    total = sum(seen.values())
    return total, {"in_units": sum(per_unit.values()), "max_unit": max(per_unit.values(), default=0),
                   "unit_inputs": inputs[0]}


def activations(dtype_name: str, attention: str = "flash") -> dict[str, dict[str, float]]:
    """Saved-activation GB for one ASPL training step (UNet + text encoder, batch 2) and one PGD step (VAE encoder +
    UNet, batch 4 or 1), with and without gradient checkpointing (estimate: outside-unit saves + unit inputs + the
    largest unit's activations, which is what is alive while that unit is recomputed in backward)."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    unet, te, vae = _sd21_base_modules()
    for m in (unet, te, vae):
        m.to(dtype)
    units = (ResnetBlock2D, BasicTransformerBlock, CLIPEncoderLayer, DownEncoderBlock2D, UNetMidBlock2D)
    meta = {"device": "meta"}

    def train_step():
        ids = torch.zeros(2, 77, dtype=torch.long, **meta)
        emb = te(ids)[0]
        z = torch.randn(2, 4, 64, 64, dtype=dtype, **meta)
        return unet(z, torch.tensor([10, 500], **meta), emb).sample

    def pgd_step(n):
        def fn():
            x = torch.randn(n, 3, 512, 512, dtype=dtype, requires_grad=True, **meta)
            z = vae.encode(x).latent_dist.mean
            emb = torch.randn(n, 77, 1024, dtype=dtype, **meta)
            return unet(z, torch.zeros(n, dtype=torch.long, **meta), emb).sample
        return fn

    out: dict[str, dict[str, float]] = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if attention == "flash":
        torch.nn.functional.scaled_dot_product_attention = _flash_sdpa()
    try:
        for name, fn, mods in (("train bs2", train_step, (unet, te)), ("pgd bs4", pgd_step(4), (unet, vae)),
                               ("pgd bs1", pgd_step(1), (unet, vae))):
            total, u = saved_activation_bytes(fn, units, mods)
            ckpt = total - u["in_units"] + u["unit_inputs"] + u["max_unit"]
            out[name] = {"no_ckpt": total / GB, "ckpt": ckpt / GB}
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return out


def estimate() -> list[dict]:
    """GPU GB of paper-profile ASPL per configuration: max over the training phase (weights + grads + AdamW states
    + activations) and the PGD phase (weights + activations; no parameter gradients, optimizer freed)."""
    unet, te, vae = _sd21_base_modules()
    n_unet = sum(q.numel() for q in unet.parameters())
    n_te = sum(q.numel() for q in te.parameters())
    n_vae = sum(q.numel() for q in vae.parameters())
    lora_params = 0.8e6  # rank-4 adapters on the UNet attention projections of SD2.1-base (measured below)
    try:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        lora_params = sum(q.numel() for n, q in unet.named_parameters() if "lora" in n)
    except Exception:  # peft on meta tensors is not essential to the estimate
        pass
    print(f"\nSD2.1-base: UNet {n_unet / 1e6:.1f}M, text encoder {n_te / 1e6:.1f}M (trained), VAE {n_vae / 1e6:.1f}M "
          f"(frozen), LoRA r=4 on the UNet attention {lora_params / 1e6:.2f}M")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    acts = {k: activations(k) for k in ("fp32", "bf16")}
    acts["bf16-math"] = activations("bf16", attention="math")  # attention matrices kept (no flash / xformers)
    for k, v in acts.items():
        print(f"saved activations {k}: " + ", ".join(f"{n} {a['no_ckpt']:.2f} GB (ckpt {a['ckpt']:.2f})" for n, a in v.items()))
    overhead = 0.8  # CUDA context, cuDNN/cuBLAS workspaces, allocator fragmentation (GB, typical)
    rows = []

    def add(name, w_bytes, trainable, state_bytes, grad_bytes, act_dtype, ckpt, pgd_bs, copies=1, snap_gpu=False,
            frozen_extra=0.0, grads_in_pgd=False):
        W = (n_unet + n_te) * w_bytes * copies / GB + n_vae * w_bytes / GB + frozen_extra
        G = trainable * grad_bytes / GB
        S = trainable * state_bytes / GB
        snap = trainable * w_bytes / GB if snap_gpu else 0.0
        a = acts[act_dtype]
        key = "ckpt" if ckpt else "no_ckpt"
        train = W + snap + G + S + a["train bs2"][key]
        pgd = W + snap + a[f"pgd bs{pgd_bs}"][key] + (G if grads_in_pgd else 0.0)
        rows.append({"config": name, "weights": W + snap, "grads": G, "adam": S, "act_train": a["train bs2"][key],
                     "act_pgd": a[f"pgd bs{pgd_bs}"][key], "peak_gb": max(train, pgd) + overhead})

    full = n_unet + n_te
    add("aspl.py: 3 bf16 copies, math attention", 2, full, 4, 2, "bf16-math", False, 4, copies=3, grads_in_pgd=True)
    add("aspl.py: 3 bf16 copies, flash attention", 2, full, 4, 2, "bf16", False, 4, copies=3, grads_in_pgd=True)
    add("fp32, no autocast, snapshot on the GPU", 4, full, 8, 4, "fp32", False, 4, snap_gpu=True)
    add("fp32 + bf16 autocast (default)", 4, full, 8, 4, "bf16", False, 4)
    add("  + gradient checkpointing", 4, full, 8, 4, "bf16", True, 4)
    add("  + ckpt + pgd_batch_size 1", 4, full, 8, 4, "bf16", True, 1)
    add("  + ckpt + pgd bs1 + 8-bit Adam", 4, full, 2, 4, "bf16", True, 1)
    add("bf16 weights + ckpt + pgd bs1", 2, full, 4, 2, "bf16", True, 1)
    add("bf16 weights + ckpt + pgd bs1 + 8-bit Adam", 2, full, 2, 2, "bf16", True, 1)
    add("LoRA surrogate, fp32 base, bf16 autocast", 4, lora_params, 8, 4, "bf16", False, 4)
    add("LoRA surrogate + ckpt + pgd bs1", 4, lora_params, 8, 4, "bf16", True, 1)
    add("LoRA surrogate, bf16 base + ckpt + pgd bs1", 2, lora_params, 8, 4, "bf16", True, 1)
    return rows


def print_estimate(rows: list[dict]) -> None:
    print("\nEstimated GPU memory of paper-profile ASPL (SD2.1-base, 512 px, batch 1+1 training, 4-image PGD), GB; "
          "snapshot on the CPU unless stated; + 0.8 GB CUDA overhead:")
    print(f"{'config':46s} {'weights':>8s} {'grads':>6s} {'AdamW':>6s} {'act.train':>9s} {'act.PGD':>8s} {'peak':>6s} fits 16 GB")
    for r in rows:
        print(f"{r['config']:46s} {r['weights']:8.2f} {r['grads']:6.2f} {r['adam']:6.2f} {r['act_train']:9.2f} "
              f"{r['act_pgd']:8.2f} {r['peak_gb']:6.1f} {'yes' if r['peak_gb'] <= 16 else 'no'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest run of each is kept")
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("SIZE", "CONFIG", "MODEL_DIR", "ROUNDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        size, config, folder, rounds = args.child
        print(json.dumps(child(size, config, Path(folder), int(rounds))))
        return
    import torch

    torch.set_num_threads(1)
    if not args.estimate_only:
        print_measured(measure(args.sizes, args.rounds, args.configs, args.repeat))
    print_estimate(estimate())


if __name__ == "__main__":
    main()
