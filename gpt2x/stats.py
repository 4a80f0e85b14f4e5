"""Statistics for ablation tables: one number per repeat, intervals across repeats (stdlib only).

The statistic:
- per repeat, one robust number: the median tokens/s over that repeat's measured steps (a median
  ignores the odd slow step: a GC pause, a checkpoint write, a recompile).
- across repeats, a 95% Student-t interval on the LOG of the values, reported as the geometric
  mean with bounds exp(mean +- t * sd / sqrt(n)). Throughput noise is multiplicative (a
  busier machine is some percent slower), so logs make intervals symmetric in percent and
  keep them positive. t, not the normal quantile, because n is a handful of repeats.
- a speed-up is PAIRED: repeat i of rung k against repeat i of rung k-1 (run back to back, so
  they share the machine's state). The log ratios cancel drift common to both rungs, which
  unpaired intervals count as noise twice. With a single pair there is no interval.
- with `interleave=steps` (gpt2x.training.turns) the rungs of a repeat took turns step by step, each its
  own process, so step j of rung k ran seconds after step j of rung k-1: that repeat's ratio is the
  median of the step-by-step ratios (`step_paired_ratio`), which cancels drift on the scale of
  seconds, not only minutes. The interval across repeats is then taken on these ratios as above.
- "within noise": the speed-up interval includes 1.00x.
- too few repeats: an interval from fewer than MIN_REPEATS values is not reported (see
  `Interval.reported`). With 2 values the t quantile is 12.7 (df = 1): two repeats 10% apart
  give an interval of about +-90%, and 40% apart +-2800%, which says nothing but "repeat more".

Missing repeats (None) are skipped everywhere; the `n` of an Interval counts the values used.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest

# the fewest values whose interval a report shows (t quantile 4.3 at df = 2, 12.7 at df = 1)
MIN_REPEATS = 3


@dataclass(frozen=True)
class Interval:
    """A center (geometric mean) with a confidence interval; lo = hi = None when n == 1."""

    center: float
    lo: float | None
    hi: float | None
    n: int
    conf: float = 0.95

    @property
    def reported(self) -> bool:
        """Whether a report shows this interval: it exists and rests on MIN_REPEATS values."""
        return self.lo is not None and self.hi is not None and self.n >= MIN_REPEATS

    @property
    def half_width_pct(self) -> float | None:
        """The wider side of the interval, in percent of the center (None without an interval)."""
        if self.lo is None or self.hi is None:
            return None
        return 100.0 * max(self.hi / self.center - 1.0, 1.0 - self.lo / self.center)

    def contains(self, x: float) -> bool | None:
        """Whether x lies in [lo, hi]; None without an interval."""
        if self.lo is None or self.hi is None:
            return None
        return self.lo <= x <= self.hi


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b): continued fraction (DLMF 8.17.22), modified Lentz."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x)) / a
    # 1 / (1 + d1 / (1 + d2 / ...)): numerators 1, d1, d2, ..., every partial denominator 1
    tiny = 1e-300
    f, c, d = tiny, tiny, 0.0
    for j in range(1000):
        if j == 0:
            num = 1.0
        elif j % 2:  # d_{2m+1}
            m = (j - 1) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            m = j // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    if math.isinf(df):
        return statistics.NormalDist().cdf(t)
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2.0, 0.5)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse Student-t CDF: t with P(T <= t) = p (e.g. p=0.975 for a two-sided 95% interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile needs 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"t distribution needs df > 0, got {df}")
    if math.isinf(df):
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the CDF is increasing, heavy tails need a large hi
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _present(values: Sequence[float | None], what: str) -> list[float]:
    """The non-None values; each must be a positive finite number (it is logged)."""
    out = [float(v) for v in values if v is not None]
    if not out:
        raise ValueError(f"{what} needs at least one value (got none after dropping None)")
    for v in out:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{what} needs positive finite values, got {v}: drop failed repeats")
    return out


def log_t_interval(values: Sequence[float | None], conf: float = 0.95) -> Interval:
    """Geometric mean with a t-interval on the logs; None values are skipped, n counts the rest."""
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    logs = [math.log(v) for v in _present(values, "log_t_interval")]
    n = len(logs)
    mean = statistics.fmean(logs)
    if n == 1:
        return Interval(math.exp(mean), None, None, 1, conf)
    half = t_quantile(0.5 + conf / 2.0, n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n, conf)


def paired_ratio(
    a: Sequence[float | None], b: Sequence[float | None], conf: float = 0.95
) -> Interval:
    """Interval of the ratios a_i / b_i, paired by index (a speed-up: a = new rung, b = previous).

    A pair with a missing value on either side (None, or past the end of the shorter list) is
    skipped; n counts the pairs used.
    """
    _present(a, "paired_ratio")  # validates before dividing
    _present(b, "paired_ratio")
    ratios = [x / y for x, y in zip_longest(a, b) if x is not None and y is not None]
    if not ratios:
        raise ValueError("paired_ratio needs at least one index where both values are present")
    return log_t_interval(ratios, conf)


def step_paired_ratio(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """The median of a[j] / b[j] over the steps j both have (one repeat's paired speed-up when
    the two rungs took turns step by step, gpt2x.training.turns)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("step_paired_ratio needs at least one step both rungs measured")
    _present([a[j] for j in common], "step_paired_ratio")
    _present([b[j] for j in common], "step_paired_ratio")
    return statistics.median(a[j] / b[j] for j in common)


def within_noise(interval: Interval) -> bool | None:
    """True when a ratio's interval includes 1.00x; None without a reported interval (fewer
    than MIN_REPEATS pairs: too few to tell)."""
    return interval.contains(1.0) if interval.reported else None


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values: measure at least one step")
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in 0..100) by linear interpolation, numpy.percentile's default."""
    if not values:
        raise ValueError("percentile of no values: measure at least one step")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q is in 0..100 (numpy's convention), got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
