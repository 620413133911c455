"""Figures over seeds: mean, sample std and a 95% Student-t interval of the mean, and
whether two settings' figures separate at 95% (paired by seed, or by their intervals).

A research figure carries its spread: the demo and the experiments report every figure
over seeds with `fmt` and state a conclusion only where `separated` holds.
"""

from __future__ import annotations

import math

import numpy as np

# Two-sided 95% quantiles of Student's t (the 0.975 quantile) for 1..30 degrees of freedom.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
    2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
    2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
    2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table above for
    df <= 30, else the Cornish-Fisher expansion around the normal quantile (error < 1e-6
    there)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def spread(values) -> tuple[float, float, tuple[float, float]]:
    """(mean, sample std (ddof=1), 95% t-interval of the mean) of >= 2 values, e.g. one
    figure over seeds."""
    x = np.asarray(values, np.float64).ravel()
    if x.size < 2 or not np.isfinite(x).all():
        raise ValueError(f"spread needs at least 2 finite values, got {x.tolist()}")
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = t975(x.size - 1) * std / math.sqrt(x.size)
    return mean, std, (mean - half, mean + half)


def fmt(values, digits: int = 4) -> str:
    """ "mean ± std [lo, hi] (n=N)" with the 95% interval of `spread`; one value alone is
    shown as "x (n=1, no spread)"."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 1:
        return f"{x[0]:.{digits}f} (n=1, no spread)"
    mean, std, (lo, hi) = spread(x)
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={x.size})"


def separated(a, b, paired: bool = True) -> bool:
    """Whether the figures `a` and `b` of two settings (one value per seed) differ at 95%.

    paired (the default; a[i] and b[i] come from the same seed, e.g. two prunings of one
    trained model): the 95% t-interval of the differences a[i] - b[i] excludes 0, which
    removes the seed-to-seed variation both settings share. Unpaired: the two settings'
    95% intervals do not overlap (conservative). Say "not resolved at this scale" where
    this is False."""
    if paired:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"paired figures need one value per seed each: {a.shape} vs {b.shape}")
        _, _, (lo, hi) = spread(a - b)
        return lo > 0 or hi < 0
    (_, _, (lo_a, hi_a)), (_, _, (lo_b, hi_b)) = spread(a), spread(b)
    return hi_a < lo_b or hi_b < lo_a
