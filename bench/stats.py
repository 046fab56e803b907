"""Uncertainty of leaderboard cells and paired comparisons of two defenses.

A cell's unit of replication is the subject; seeds repeat the whole pipeline for one subject. Intervals are
two-stage (cluster) expanded percentile bootstraps of the mean over all (subject, seed) values: resample subjects with
replacement, then each drawn subject's seeds with replacement (Davison & Hinkley 1997, sec. 3.8; with one seed
this is the ordinary bootstrap over subjects, with one subject a bootstrap over seeds). A fixed seed makes every
interval deterministic. Paired tests compare two defenses on the same (subject, seed) cells: the same cluster
bootstrap of the mean difference, the Wilcoxon signed-rank test (scipy) and two effect sizes (Cohen's d_z and the
matched-pairs rank-biserial correlation, Kerby 2014).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
SEED = 20240611


def _padded(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(g) for g in groups])
    out = np.zeros((len(groups), counts.max()))
    for i, g in enumerate(groups):
        out[i, :len(g)] = g
    return out, counts


def cluster_bootstrap_means(groups: list[np.ndarray], n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """``n_boot`` bootstrap replicates of the mean of all values, subjects (``groups``) resampled with replacement
    and then each drawn subject's values (seeds) with replacement."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    values, counts = _padded(groups)
    rng = np.random.default_rng(seed)
    s = rng.integers(0, len(groups), size=(n_boot, len(groups)))  # drawn subjects
    c = counts[s]  # (B, S) their numbers of seeds
    kmax = counts.max()
    j = np.floor(rng.random((n_boot, len(groups), kmax)) * c[..., None]).astype(int)  # drawn seeds, < count
    mask = np.arange(kmax)[None, None, :] < c[..., None]
    drawn = values[s[..., None], j]
    return (drawn * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))


def bootstrap_ci(groups: list[np.ndarray], level: float = LEVEL, n_boot: int = N_BOOT,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile ``level`` interval of the mean over all values (see the module docstring); NaN, NaN for fewer than
    two values or any non-finite value (an infinite PSNR has no interval)."""
    flat = np.concatenate([np.asarray(g, dtype=float) for g in groups]) if groups else np.array([])
    if len(flat) < 2 or not np.isfinite(flat).all():
        return math.nan, math.nan
    reps = cluster_bootstrap_means(groups, n_boot, seed)
    alpha = expanded_alpha(len(groups) if len(groups) > 1 else len(flat), level)
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return float(lo), float(hi)


@functools.lru_cache(maxsize=None)
def expanded_alpha(n: int, level: float = LEVEL) -> float:
    """The tail probability of Hesterberg's expanded percentile interval (Hesterberg 2015, "What teachers should
    know about the bootstrap", sec. 5.2): Phi(-sqrt(n / (n - 1)) t_{n-1, (1 + level) / 2}) instead of
    (1 - level) / 2, which corrects the plain percentile interval's under-coverage for few subjects (n units)."""
    from statistics import NormalDist

    from scipy.special import stdtrit  # Student t quantile (scipy.special imports much faster than scipy.stats)

    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * float(stdtrit(n - 1, (1 + level) / 2)))


@dataclass(frozen=True)
class Paired:
    """B minus A over paired (subject, seed) values."""

    n: int  # pairs
    subjects: int
    mean_a: float
    mean_b: float
    diff: float  # mean of B - A
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    cohen_dz: float  # mean difference / sd of the differences
    rank_biserial: float  # (sum of positive ranks - sum of negative ranks) / total rank sum, in [-1, 1]

    @property
    def significant(self) -> bool | None:
        """The interval excludes 0; None when it cannot be computed (fewer than two pairs)."""
        if math.isnan(self.ci_low):
            return None
        return self.ci_low > 0 or self.ci_high < 0


def _paired_diffs(a: dict[tuple, float], b: dict[tuple, float]) -> tuple[list[tuple], np.ndarray, list[np.ndarray]]:
    """Keys in both with finite values (sorted), their differences b - a, and the differences grouped by subject
    (the first key element)."""
    keys = sorted(k for k in a.keys() & b.keys() if np.isfinite(a[k]) and np.isfinite(b[k]))
    d = np.array([b[k] - a[k] for k in keys])
    by_subject: dict = {}
    for k, v in zip(keys, d):
        by_subject.setdefault(k[0], []).append(v)
    return keys, d, [np.array(v) for v in by_subject.values()]


def differs(a: dict[tuple, float], b: dict[tuple, float], level: float = LEVEL) -> bool | None:
    """Whether the paired interval of the mean difference b - a excludes 0 (``Paired.significant`` without the
    rest of the test); None for fewer than two pairs."""
    _, _, groups = _paired_diffs(a, b)
    lo, hi = bootstrap_ci(groups, level) if groups else (math.nan, math.nan)
    return None if math.isnan(lo) else bool(lo > 0 or hi < 0)


def paired_test(a: dict[tuple, float], b: dict[tuple, float], level: float = LEVEL, n_boot: int = N_BOOT,
                seed: int = SEED) -> Paired:
    """Paired comparison of two defenses' values keyed by (subject, seed, ...); the first key element is the
    subject (the bootstrap's cluster). Keys present in one only, and non-finite values, are left out."""
    from scipy.stats import rankdata, wilcoxon

    keys, d, groups = _paired_diffs(a, b)
    if len(keys) == 0:
        return Paired(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    lo, hi = bootstrap_ci(groups, level, n_boot, seed)
    nonzero = d[d != 0]  # Wilcoxon's zero_method "wilcox": ties at zero carry no sign
    if len(nonzero) == 0:
        p, rb = 1.0, 0.0
    else:
        p = float(wilcoxon(nonzero).pvalue)
        r = rankdata(np.abs(nonzero))
        rb = float((r[nonzero > 0].sum() - r[nonzero < 0].sum()) / r.sum())
    sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    dz = float(d.mean() / sd) if sd > 0 else math.nan  # undefined for one pair or identical differences
    return Paired(len(keys), len(groups), float(np.mean([a[k] for k in keys])), float(np.mean([b[k] for k in keys])),
                  float(d.mean()), lo, hi, p, dz, rb)
