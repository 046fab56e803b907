"""Latent-diffusion training pieces shared by attacks (DreamBooth, LoRA) and white-box defenses (ASPL, AdvDM, APDM).

Pixel convention: images are uint8 HxWx3 between stages and float tensors in [-1, 1] (NCHW) inside models, as in
Anti-DreamBooth (``Normalize([0.5], [0.5])``), so an L-inf budget of e /255 pixels is e/127.5 in tensor units.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images (same shape) -> float32 NCHW tensor in [-1, 1] (x / 127.5 - 1)."""
    if not len(images):
        raise ValueError("to_tensor: no images")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"to_tensor: expected uint8 HxWx3 images of one shape, got shapes {sorted(shapes)}")
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(t: torch.Tensor) -> list[np.ndarray]:
    """NCHW tensor in [-1, 1] -> uint8 HxWx3 images with Anti-DreamBooth's quantisation (METHODS.md 0):
    ``(x * 127.5 + 128).clamp(0, 255)`` truncated to uint8, i.e. floor(y + 0.5) with y = x * 127.5 + 127.5 the exact
    inverse of ``to_tensor``: round-half-up to the nearest pixel value, so ``to_uint8(to_tensor(im)) == im``."""
    x = (t.detach().float().cpu() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return [im for im in x.permute(0, 2, 3, 1).numpy()]


def encode_prompt(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder last hidden states (N x 77 x D) for ``prompts``, padded to max length, truncated."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class LatentCache:
    """VAE posteriors of fixed images, encoded once (VAE frozen): ``sample`` draws ``mean + std * randn`` from a
    generator, the same distribution as re-encoding and calling ``latent_dist.sample()`` (METHODS.md 1.2), without
    re-running the encoder. Returned latents are multiplied by the VAE's ``scaling_factor``."""

    def __init__(self, vae, images: torch.Tensor, batch_size: int = 16) -> None:
        dtype = next(vae.parameters()).dtype
        device = next(vae.parameters()).device
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                dist = vae.encode(images[start:start + batch_size].to(device, dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        self.mean = torch.cat(means)
        self.std = torch.cat(stds)
        self.scaling_factor = float(vae.config.scaling_factor)

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        mean, std = self.mean[idx.to(self.mean.device)], self.std[idx.to(self.mean.device)]
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * eps) * self.scaling_factor


def draw_timesteps_noise(noise_scheduler, latents: torch.Tensor, generator: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U{0..T-1} (one per sample) and eps ~ N(0, I) of ``latents``' shape, from a CPU generator."""
    n = noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, n, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return t.to(latents.device), noise.to(latents.device, latents.dtype)


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   generator: torch.Generator | None, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, per_sample: bool = False, mask: torch.Tensor | None = None):
    """The latent-diffusion loss (METHODS.md 1.2): z_t = add_noise(z0, eps, t), MSE of the UNet output against eps
    (``epsilon``) or the velocity (``v_prediction``), mean over all elements. ``timesteps``/``noise`` default to
    draws from ``generator``. With ``per_sample`` returns (mean loss, per-sample losses). ``mask`` (broadcast to the
    latents, e.g. N x 1 x h x w): a sample's loss is sum(error * mask) / sum(mask) instead of the mean (Custom
    Diffusion's valid-region loss: a one-channel mask sums the error over the latent channels)."""
    if timesteps is None or noise is None:
        t_draw, n_draw = draw_timesteps_noise(noise_scheduler, latents, generator)
        timesteps = t_draw if timesteps is None else timesteps
        noise = n_draw if noise is None else noise
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config (epsilon or v_prediction)")
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, pred.ndim))
    losses = err.mean(dim=dims) if mask is None else (err * mask).sum(dim=dims) / mask.sum(dim=dims)
    loss = losses.mean()
    return (loss, losses) if per_sample else loss


def adamw(params, **kw):
    """torch AdamW with the fused kernel where torch has it for the parameters' device (CPU, CUDA): one pass over all
    parameters instead of a loop of small ops (benchmarks/step_profile.py: 0.31x the for-loop step on 27.7 M
    parameters on one CPU thread); equal to torch's default implementation up to float rounding (1e-9 after a step).
    ``kw`` as torch.optim.AdamW (lr, betas, weight_decay, eps)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(params, **kw)
