"""L-inf projected gradient steps shared by the data-level defenses (METHODS.md 0).

Budgets and steps are given in /255 pixel units and converted here to the [-1, 1] tensor space the
reference code works in (1/255 pixel = 2/255 tensor units). Saving uses Anti-DreamBooth's quantisation
(``bench.diffusion.to_uint8``) followed by a final clip to floor(eps) so the saved uint8 image never exceeds the
declared budget (e.g. PhotoGuard's 7.65/255 would otherwise round to 8).
"""
from __future__ import annotations

import numpy as np
from bench.lazy import lazy_import
torch = lazy_import("torch")

from bench.diffusion import to_uint8
from defenses.baselines import project_to_budget


def to_tensor_units(value_255: float) -> float:
    """/255 pixel units -> [-1, 1] tensor units."""
    return value_255 * 2.0 / 255.0


def pgd_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha_255: float, eps_255: float,
             ascend: bool = True) -> torch.Tensor:
    """One signed step: x <- clip_[-1,1](x0 + clip_[-eps,eps](x +- alpha * sign(grad) - x0)), in tensor units."""
    alpha, eps = to_tensor_units(alpha_255), to_tensor_units(eps_255)
    step = alpha * grad.sign()
    x = x + step if ascend else x - step
    return (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0).detach()


def random_start(x0: torch.Tensor, eps_255: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform start in the eps-ball (advertorch's ``rand_init``, PhotoGuard's notebooks)."""
    eps = to_tensor_units(eps_255)
    noise = (torch.rand(x0.shape, generator=generator, dtype=x0.dtype) * 2 - 1).to(x0.device) * eps
    return (x0 + noise).clamp(-1.0, 1.0)


def save_within_budget(x: torch.Tensor, clean: list[np.ndarray], eps_255: float) -> list[np.ndarray]:
    """Quantise like the reference code, then guarantee max |out - clean| <= floor(eps) for every pixel."""
    return [project_to_budget(c, q.astype(np.float64), eps_255) for q, c in zip(to_uint8(x), clean)]
