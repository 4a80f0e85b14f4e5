"""gpt2x.stats on hand-computed inputs: t quantiles, log t-intervals, paired speed-ups."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from gpt2x.stats import (
    Interval,
    log_t_interval,
    median,
    paired_ratio,
    percentile,
    step_paired_ratio,
    t_cdf,
    t_quantile,
    within_noise,
)

# Published two-sided 95% critical values (t_{0.975, df}).
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 29: 2.045230, math.inf: 1.959964}


@pytest.mark.parametrize("df", list(T975))
def test_t_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=5e-7)


def test_t_quantile_other_levels_symmetry_and_cdf_inverse():
    assert t_quantile(0.995, 1) == pytest.approx(63.656741, abs=5e-6)  # 99%, df 1
    assert t_quantile(0.95, 10) == pytest.approx(1.812461, abs=5e-7)  # 90%, df 10
    assert t_quantile(0.025, 4) == pytest.approx(-T975[4], abs=5e-7)
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    for df in (3, 7.5, 200):
        assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0.975, 0)


def test_log_t_interval_hand_computed():
    iv = log_t_interval([100.0, 110.0, 121.0])
    logs = [math.log(100), math.log(110), math.log(121)]  # equally spaced by log(1.1)
    half = 4.302653 * statistics.stdev(logs) / math.sqrt(3)
    assert iv.n == 3
    assert iv.center == pytest.approx(110.0, rel=1e-12)  # geometric mean
    assert iv.lo == pytest.approx(110.0 * math.exp(-half), rel=1e-6)
    assert iv.hi == pytest.approx(110.0 * math.exp(half), rel=1e-6)
    # multiplicative: symmetric in log, so hi/center == center/lo and the wider side is hi
    assert iv.hi / iv.center == pytest.approx(iv.center / iv.lo, rel=1e-12)
    assert iv.half_width_pct == pytest.approx(100 * (math.exp(half) - 1), rel=1e-6)
    assert iv.contains(110.0) and not iv.contains(200.0)


def test_log_t_interval_conf_widens_and_constant_values_collapse():
    values = [98.0, 103.0, 101.0, 99.5]
    iv95, iv99 = log_t_interval(values), log_t_interval(values, conf=0.99)
    assert iv99.lo < iv95.lo < iv95.center < iv95.hi < iv99.hi
    flat = log_t_interval([5.0, 5.0, 5.0])
    assert flat.lo == pytest.approx(5.0) and flat.hi == pytest.approx(5.0)
    assert flat.half_width_pct == pytest.approx(0.0, abs=1e-9)


def test_single_value_has_no_interval():
    iv = log_t_interval([1234.0])
    assert (iv.center, iv.lo, iv.hi, iv.n) == (pytest.approx(1234.0), None, None, 1)
    assert iv.half_width_pct is None
    assert iv.contains(1234.0) is None
    assert within_noise(paired_ratio([2.0], [1.0])) is None


def test_none_values_are_skipped_and_counted_out():
    assert log_t_interval([100.0, None, 121.0]) == log_t_interval([100.0, 121.0])
    assert log_t_interval([None, 7.0]).n == 1


@pytest.mark.parametrize(
    "values, match",
    [
        ([], "at least one value"),
        ([None, None], "at least one value"),
        ([1.0, 0.0], "positive finite"),
        ([1.0, -3.0], "positive finite"),
        ([1.0, math.nan], "positive finite"),
        ([1.0, math.inf], "positive finite"),
    ],
)
def test_bad_values_raise_one_line(values, match):
    with pytest.raises(ValueError, match=match) as err:
        log_t_interval(values)
    assert "\n" not in str(err.value)


def test_bad_conf_raises():
    with pytest.raises(ValueError, match="conf"):
        log_t_interval([1.0, 2.0], conf=95)


def test_paired_ratio_hand_computed():
    new, old = [120.0, 130.0, 115.0], [100.0, 110.0, 100.0]
    ratios = [1.2, 130 / 110, 1.15]
    logs = [math.log(r) for r in ratios]
    mean, half = statistics.fmean(logs), 4.302653 * statistics.stdev(logs) / math.sqrt(3)
    iv = paired_ratio(new, old)
    assert iv.n == 3
    assert iv.center == pytest.approx(math.exp(mean), rel=1e-12)
    assert iv.lo == pytest.approx(math.exp(mean - half), rel=1e-6)
    assert iv.hi == pytest.approx(math.exp(mean + half), rel=1e-6)
    assert within_noise(iv) is False  # all three repeats agree on ~1.18x


def test_paired_interval_cancels_drift_that_unpaired_intervals_count_as_noise():
    # The machine drifts (repeat 2 fast, repeat 3 slow) for both rungs alike; the new rung is a
    # steady 5% faster within each pair.
    old = [100.0, 120.0, 80.0]
    new = [105.0, 126.5, 83.8]
    a, b = log_t_interval(new), log_t_interval(old)
    assert a.lo < b.hi and b.lo < a.hi  # the unpaired intervals overlap widely...
    iv = paired_ratio(new, old)
    assert iv.lo > 1.0  # ...but every pair says faster: the paired interval excludes 1
    assert within_noise(iv) is False
    assert iv.center == pytest.approx(1.05, abs=0.005)


def test_within_noise_true_when_interval_straddles_one():
    iv = paired_ratio([101.0, 99.0, 100.5, 99.6], [100.0, 100.0, 100.0, 100.0])
    assert iv.lo < 1.0 < iv.hi
    assert within_noise(iv) is True
    assert within_noise(Interval(1.0, 1.01, 1.10, 3)) is False
    assert within_noise(Interval(1.0, 0.99, 1.0, 3)) is True  # the bound itself counts


def test_paired_ratio_skips_missing_pairs():
    # repeat 1 failed on the new rung, repeat 3 is missing on the old one (shorter list)
    iv = paired_ratio([110.0, None, 121.0, 130.0], [100.0, 100.0, 110.0])
    assert iv == paired_ratio([110.0, 121.0], [100.0, 110.0])
    assert iv.n == 2
    with pytest.raises(ValueError, match="both values are present"):
        paired_ratio([1.0, None], [None, 2.0])
    with pytest.raises(ValueError, match="positive finite"):
        paired_ratio([1.0, 2.0], [0.0, 1.0])  # never divides by zero


def test_step_paired_ratio_is_the_median_of_the_common_steps_ratios():
    new = {3: 110.0, 4: 90.0, 5: 150.0, 6: 100.0}  # step 6: the old rung has no such step
    old = {2: 1.0, 3: 100.0, 4: 100.0, 5: 100.0}
    # ratios at steps 3, 4, 5: 1.1, 0.9, 1.5 -> median 1.1 (the slow step 5 of `old` counts once)
    assert step_paired_ratio(new, old) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="at least one step both rungs measured"):
        step_paired_ratio({1: 1.0}, {2: 1.0})
    with pytest.raises(ValueError, match="positive finite"):
        step_paired_ratio({1: 1.0}, {1: 0.0})


def test_median_and_percentile_match_numpy():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert median(values) == pytest.approx(float(np.median(values)))
    assert median([7.0]) == 7.0
    for q in (0, 10, 25, 50, 90, 99.5, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([4.0], 90) == 4.0
    with pytest.raises(ValueError, match="no values"):
        median([])
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile(values, 900)
