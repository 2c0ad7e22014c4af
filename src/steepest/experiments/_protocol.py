"""The protocol every learning experiment of ``steepest reproduce`` follows, and its shared pieces.

1. **Three parts of the data.** A training part, a validation part and a test part
   (:func:`steepest.experiments._data.digits_three_way`: the validation part is the same
   for every replicate, the train/test division and the initialization change with it).
2. **Every choice on validation.** Learning rates, temperatures, κ, the variant of a
   rule, penalty weights: each candidate setting is trained on every replicate and the
   setting with the best mean validation score is chosen (:func:`choose`); a setting
   that diverged on any replicate is never chosen over one that did not.
3. **The same tuning budget per arm.** Arms that are compared get grids of the same size.
4. **Verdicts on test.** The chosen settings are then read once on the test part,
   paired by replicate (same data division, initialization and batch order), and the
   verdict comes from the t-based 95 % confidence interval of the paired differences
   (:func:`paired`, :func:`outcome`): *held* when the whole interval lies on the
   claimed side, *partly held* when only the mean does, *not held* when the mean does
   not. A verdict needs at least :data:`MIN_SEEDS` replicates; with fewer, the
   direction is shown and the claim stays *not measured* (:func:`direction_only`).
5. **Spread everywhere.** Every mean is shown with its spread and n (:func:`fmt_spread`);
   one value is shown as one value, never with a "± 0".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

#: a verdict on a learning claim needs at least this many paired replicates (a t interval with ≥ 2 df)
MIN_SEEDS = 3
#: replicates of a full run (fewer only where one run is long, and the report says so)
FULL_SEEDS = 5
LEVEL = 0.95

K = TypeVar("K", bound=Hashable)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    """Mean of ``values`` with its t-based confidence interval and the two-sided p-value against ``null``.

    ``sd`` is the sample standard deviation (nan for one value), ``lo``/``hi`` the interval (nan when
    n < 2), ``above`` how many values exceed ``null``. A non-finite value makes the mean non-finite and
    the interval collapse onto it (a diverged run is not averaged away).
    """

    values: tuple[float, ...]
    null: float = 0.0
    level: float = LEVEL

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    @property
    def mean(self) -> float:
        if not self.values:
            return math.nan
        if not self.finite:
            return math.nan if any(math.isnan(v) for v in self.values) else sum(self.values)  # ±inf (or nan)
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 and self.finite else math.nan

    @property
    def half_width(self) -> float:
        if self.n < 2 or not self.finite:
            return math.nan
        return t_quantile(self.n - 1, self.level) * self.sd / math.sqrt(self.n)

    @property
    def lo(self) -> float:
        return self.mean if not self.finite else self.mean - self.half_width

    @property
    def hi(self) -> float:
        return self.mean if not self.finite else self.mean + self.half_width

    @property
    def p(self) -> float:
        """Two-sided p-value of the one-sample t test of mean = ``null`` (nan when n < 2 or not finite)."""
        if self.n < 2 or not self.finite:
            return math.nan
        from scipy.stats import t

        if self.sd == 0:
            return 0.0 if self.mean != self.null else 1.0
        stat = (self.mean - self.null) / (self.sd / math.sqrt(self.n))
        return float(2 * t.sf(abs(stat), self.n - 1))

    @property
    def above(self) -> int:
        return sum(v > self.null for v in self.values)

    def record(self, scale: str = "") -> dict[str, float | int | list[float] | str]:
        """The interval as results.json stores it."""
        out: dict[str, float | int | list[float] | str] = {
            "n": self.n, "mean": self.mean, "sd": self.sd, "ci95": [self.lo, self.hi], "p": self.p,
            "values": list(self.values)}
        if scale:
            out["scale"] = scale
        return out


def interval(values: Sequence[float], null: float = 0.0) -> Interval:
    """:class:`Interval` of ``values`` (floats) against ``null``."""
    return Interval(tuple(float(v) for v in values), float(null))


def paired(a: Sequence[float], b: Sequence[float], *, log: bool = False) -> Interval:
    """Paired differences ``a_i − b_i`` (``log``: ``log(a_i / b_i)``, a ratio's log) with their interval.

    ``a`` and ``b`` are per-replicate values in the same order (same data division, seed, batches).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same replicates, got {len(a)} and {len(b)}")
    if log:
        return interval([_log_ratio(x, y) for x, y in zip(a, b)])
    return interval([float(x) - float(y) for x, y in zip(a, b)])


def _log_ratio(x: float, y: float) -> float:
    x, y = float(x), float(y)
    if math.isnan(x) or math.isnan(y):
        return math.nan
    if x == y:
        return 0.0
    if not math.isfinite(x) or y == 0:
        return math.inf
    if not math.isfinite(y) or x == 0:
        return -math.inf
    return math.log(x / y)


def outcome(iv: Interval, *, above: float | None = None, below: float | None = None) -> str:
    """The verdict word for "the mean lies above ``above``" (or "below ``below``") from an interval.

    held: the whole confidence interval lies on the claimed side; partly held: the mean does, the
    interval reaches across; not held: the mean does not (a non-finite mean counts by its sign, nan as
    not held). Fewer than :data:`MIN_SEEDS` values: not measured.
    """
    if (above is None) == (below is None):
        raise ValueError("give exactly one of above= and below=")
    if iv.n < MIN_SEEDS:
        return "not measured"
    m = iv.mean
    if math.isnan(m):
        return "not held"
    if above is not None:
        return "held" if iv.lo > above else ("partly held" if m > above else "not held")
    return "held" if iv.hi < below else ("partly held" if m < below else "not held")  # type: ignore[operator]


def combine(outcomes: Sequence[str]) -> str:
    """One verdict from the verdicts of a claim's parts: held (not held) when every part is, else partly held;
    not measured when any part is."""
    if not outcomes or "not measured" in outcomes:
        return "not measured"
    if all(o == "held" for o in outcomes):
        return "held"
    if all(o == "not held" for o in outcomes):
        return "not held"
    return "partly held"


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (family-wise error); nan stays nan."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def mean_or_inf(values: Sequence[float]) -> float:
    """The mean of per-replicate scores, +inf when any replicate diverged (not finite): a setting that
    diverged once is never chosen over one that did not."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) for v in vals):
        return math.inf
    return statistics.fmean(vals)


def choose(scores: Mapping[K, float], *, higher: bool = False) -> K:
    """The key with the best score (lowest, or highest with ``higher``); ties and all-non-finite go to the
    first key in order. This is the only way settings are chosen, and only on validation scores."""
    if not scores:
        raise ValueError("nothing to choose from")
    sign = -1.0 if higher else 1.0
    best, best_v = None, math.inf
    for k, v in scores.items():
        v = sign * float(v)
        if math.isnan(v):
            continue
        if best is None or v < best_v:
            best, best_v = k, v
    return next(iter(scores)) if best is None else best


# --------------------------------------------------------------------------- wording
def fmt_spread(values: Sequence[float], spec: str = ".3f", unit: str = "") -> str:
    """``"0.079 ± 0.004 (n = 5)"``: mean ± sample standard deviation and n; one value alone with
    ``(n = 1)``; a non-finite value as the count of diverged runs."""
    vals = [float(v) for v in values]
    if not vals:
        return "–"
    bad = sum(not math.isfinite(v) for v in vals)
    if bad:
        return f"diverged in {bad}/{len(vals)}"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:{spec}}{unit} (n = 1)"
    return f"{m:{spec}} ± {statistics.stdev(vals):{spec}}{unit} (n = {len(vals)})"


def fmt_cell(values: Sequence[float], spec: str = ".3f") -> str:
    """A table cell: ``"0.079 ± 0.004"`` (n stated once, in the caption: :func:`n_caption`), one value alone,
    ``"diverged 1/5"`` when runs diverged."""
    vals = [float(v) for v in values]
    if not vals:
        return "–"
    bad = sum(not math.isfinite(v) for v in vals)
    if bad:
        return f"diverged {bad}/{len(vals)}"
    m = statistics.fmean(vals)
    return f"{m:{spec}}" if len(vals) == 1 else f"{m:{spec}} ± {statistics.stdev(vals):{spec}}"


def n_caption(n: int, what: str = "seed") -> str:
    """How a table's cells aggregate ``n`` runs: "mean ± sd over 5 seeds" or "one seed, no spread"."""
    return f"one {what}, no spread" if n == 1 else f"mean ± sd over {n} {what}s"


def _signed(x: float, spec: str) -> str:
    """``x`` with its sign; a value that rounds to 0 is "+0" (no "-0.0")."""
    s = f"{x:+{spec}}"
    return f"{0.0:+{spec}}" if float(s) == 0 else s


def fmt_interval(iv: Interval, spec: str = ".2f", unit: str = "", *, ratio: bool = False) -> str:
    """A paired difference as the report writes it.

    ``"+1.9 pp, 95 % CI [−2.3, +6.1], p = 0.20, n = 3 (3/3 > 0)"``; ``ratio=True`` for an interval of log
    ratios, shown as the geometric-mean ratio ``"1.12×, 95 % CI [0.98×, 1.28×], n = 5 (4/5 > 1)"``. One
    value: the value and "n = 1: direction only"; replicates that all agree: the value and "no spread" (a
    zero-width interval and p = 0 would read as certainty); a non-finite mean: which way it diverged.
    """
    if iv.n == 0:
        return "–"
    if not iv.finite:
        bad = sum(not math.isfinite(v) for v in iv.values)
        return f"diverged in {bad}/{iv.n} replicates"
    conv = (lambda v: f"{math.exp(v):{spec}}×") if ratio else (lambda v: _signed(v, spec) + unit)  # noqa: E731
    ref = "1" if ratio else "0"
    if iv.n == 1:
        return f"{conv(iv.mean)} (n = 1: direction only)"
    if iv.sd == 0:  # every replicate gave the same value (e.g. a count read on a grid): no interval to show
        return f"{conv(iv.mean)} in each of the {iv.n} replicates, no spread ({iv.above}/{iv.n} > {ref})"
    return (f"{conv(iv.mean)}, 95 % CI [{conv(iv.lo)}, {conv(iv.hi)}], p = {iv.p:.2g}, n = {iv.n} "
            f"({iv.above}/{iv.n} > {ref})")


def direction_only(n: int, command: str) -> str:
    """What a run with fewer than :data:`MIN_SEEDS` replicates can and cannot show."""
    who = "One seed" if n == 1 else f"{n} seeds"
    return (f"{who} can show the direction of a difference, not whether it exceeds the seed-to-seed noise "
            f"(a 95 % interval needs at least {MIN_SEEDS} paired seeds): the verdict stays *not measured* and "
            f"`{command}` measures it.")


def protocol_text(replicates: str, choices: str, n: int, *, long_runs: str = "") -> str:
    """The paragraph each learning experiment opens its protocol with."""
    size = (f"{n} replicates" if n > 1 else "one replicate")
    return (f"**Protocol.** Train / validation / test: {replicates}. Chosen on validation (the mean over the "
            f"replicates of each candidate's validation score): {choices}. Verdicts are read once on the test part, "
            f"paired by replicate, from t-based 95 % confidence intervals: *held* when the whole interval lies on the "
            f"claimed side, *partly held* when only the mean does, *not held* otherwise. This run: {size}"
            + (f" ({long_runs})" if long_runs else "") + "."
            + (f" A verdict needs at least {MIN_SEEDS}." if n < MIN_SEEDS else ""))
