"""Compare selection strategies across runs and seeds: learning curves, final values, AUC, sample efficiency.

    python scripts/compare_runs.py RUN_DIR_OR_SWEEP_DIR [...] --out DIR [--metrics m1,m2] [--baseline uniform]

Every directory holding both metrics.jsonl and config.yaml (at any depth under the given paths) is a
run; one without summary.json (still running, or stopped) is left out unless --include-unfinished.
Runs are grouped by `selection_strategy` ('none' for plain SFT/DPO) and, within a strategy, by `seed`
(one run per strategy and seed). Runs of one strategy at different learning rates or laplace priors
(`VARIANT_KEYS`) are told apart by their settings: 'uniform@lr=0.0005'. For each metric, a strategy's learning curve is the mean over seeds
of the metric against labels (labels bought/used so far), with a band of +-1 sample standard deviation
across seeds. Seeds are aligned on the union of their eval label counts inside the label
range that every seed covers, each seed linearly interpolated there.

Written to --out: one PNG per metric, comparison.md (also printed) and comparison.csv with, per
strategy and metric: final value (each seed's last eval) mean +- sample std over seeds; AUC (trapezoid
of the mean curve over labels divided by the label range, i.e. the curve's mean value, in the metric's
unit); labels needed to reach the baseline's final mean (first crossing of the mean curve, linearly
interpolated, 'never' if it does not get there); Welch's t-test of final values against the baseline
(two-sided p), when both have at least 2 seeds. Lower is better for metrics whose name contains
'loss', 'wrong' or 'distance' (`lower_is_better`), higher otherwise.

The default baseline is 'uniform' (offline runs), else 'uniref' (online runs) when present.
Default metrics: every eval metric (see `is_eval_metric`) logged in all runs.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import read_jsonl  # noqa: E402

EVAL_PREFIXES = ("haiku", "jeopardy", "win_rate")
DEFAULT_BASELINES = ("uniform", "uniref")
LOWER_IS_BETTER_WORDS = ("loss", "wrong", "distance")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CompareError(Exception):
    """A problem with the runs or arguments the user gave; reported as a one-line error."""


@dataclass
class Run:
    """One training run: `records` are the metrics.jsonl lines, `config` the resolved config.yaml."""
    path: str
    strategy: str
    seed: int
    records: List[Dict[str, Any]]
    config: Dict[str, Any]


@dataclass
class Curve:
    """A strategy's learning curve for one metric. labels: label counts (x); mean, std: over seeds at
    each label count (sample std, 0 with one seed); finals: each seed's last eval value; seeds: their seeds."""
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    finals: List[float]
    seeds: List[int]


# ---------------------------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------------------------

def find_run_dirs(path: str) -> List[str]:
    """`path` itself if it is a run directory, else every run directory below it (sorted)."""
    if not os.path.isdir(path):
        raise CompareError(f"{path} is not a directory")
    found = [d for d, _, files in os.walk(path) if "metrics.jsonl" in files and "config.yaml" in files]
    return sorted(found)


def strategy_of(config: Dict[str, Any]) -> str:
    """The run's selection_strategy ('none' for plain SFT/DPO), with its estimator when it reads one
    ('ae/laplace'), and marked '(uses labels)' when it reads the labels (a headroom check, not a method)."""
    name = config.get("selection_strategy")
    if not name:
        return "none"
    from strategies import STRATEGIES
    strategy = STRATEGIES.get(name)
    if strategy is not None and strategy.needs_spread and config.get("uncertainty_method"):
        name = f"{name}/{config['uncertainty_method']}"
    if strategy is not None and strategy.uses_labels:
        name = f"{name} (uses labels)"
    return name


# Settings that tell runs of one strategy apart when they differ among its runs (a learning-rate sweep,
# the laplace prior): the strategy's name then carries them, 'uniform@lr=0.0005'.
VARIANT_KEYS = ("lr", "laplace_prior", "laplace_prior_std")


def _setting(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def name_variants(runs: Sequence["Run"]) -> None:
    """Append '@key=value,...' to the strategy of runs whose VARIANT_KEYS differ among the runs of that
    strategy, in place; a strategy run at one setting keeps its plain name."""
    by_strategy: Dict[str, List[Run]] = {}
    for run in runs:
        by_strategy.setdefault(run.strategy, []).append(run)
    for members in by_strategy.values():
        keys = [k for k in VARIANT_KEYS if len({_setting(r.config.get(k)) for r in members}) > 1]
        for run in members if keys else []:
            run.strategy += "@" + ",".join(f"{k}={_setting(run.config.get(k))}" for k in keys)


def _number_or_text(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _parts(text: str) -> Tuple[str, Dict[str, Any]]:
    """'uniform@lr=5e-4' -> ('uniform', {'lr': 0.0005}): settings as numbers where they are."""
    base, _, settings = text.partition("@")
    pairs = [item.partition("=") for item in filter(None, settings.split(","))]
    return base, {key: _number_or_text(value) for key, _, value in pairs}


def same_strategy(name: str, requested: str, runs: Sequence["Run"] = ()) -> bool:
    """Whether a strategy matches a requested one, settings compared as numbers ('uniform@lr=5e-4' matches
    'uniform@lr=0.0005'). A setting the name does not carry (the strategy ran at one setting) is read from
    its runs' configs: 'uniform@lr=2e-3' matches 'uniform' when every run of it has lr 0.002."""
    base, settings = _parts(name)
    wanted_base, wanted = _parts(requested)
    if base != wanted_base:
        return False
    for key, value in wanted.items():
        if key not in settings:
            found = {_number_or_text(r.config.get(key)) for r in runs}
            settings[key] = found.pop() if len(found) == 1 else None
    return settings == wanted


def make_run(path: str, config: Dict[str, Any], records: List[Dict[str, Any]]) -> Run:
    if "seed" not in config:
        raise CompareError(f"{path}/config.yaml has no seed")
    return Run(path=path, strategy=strategy_of(config), seed=int(config["seed"]), records=records, config=config)


def load_runs(paths: Sequence[str], include_unfinished: bool = False) -> List[Run]:
    """Every run under `paths` (run or sweep directories), each directory once. A run without summary.json
    is still running or was stopped: its last eval is not its final value, so it is left out (with a
    warning) unless `include_unfinished`."""
    dirs = sorted({os.path.abspath(d) for p in paths for d in find_run_dirs(p)})
    if not dirs:
        raise CompareError(f"no run directory (metrics.jsonl + config.yaml) under {', '.join(paths)}")
    unfinished = [d for d in dirs if not os.path.exists(os.path.join(d, "summary.json"))]
    if unfinished and not include_unfinished:
        dirs = [d for d in dirs if d not in unfinished]
        if not dirs:
            raise CompareError(f"no finished run (with summary.json) under {', '.join(paths)}; "
                               "--include-unfinished compares the runs so far")
        warnings.warn(f"left out {len(unfinished)} unfinished run(s) without summary.json "
                      f"({', '.join(os.path.basename(d) for d in unfinished)}); --include-unfinished counts "
                      "their last eval as final")
    runs = []
    for d in dirs:
        with open(os.path.join(d, "config.yaml")) as f:
            config = yaml.safe_load(f) or {}
        runs.append(make_run(d, config, read_jsonl(os.path.join(d, "metrics.jsonl"))))
    name_variants(runs)
    return runs


# ---------------------------------------------------------------------------------------------
# Pure core: grouping, curves, statistics
# ---------------------------------------------------------------------------------------------

def group_runs(runs: Sequence[Run]) -> Dict[str, List[Run]]:
    """strategy -> its runs sorted by seed. Two runs with the same strategy and seed would be counted as
    two seeds, so that is an error. A warning is raised when runs use different datasets."""
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(run.strategy, []).append(run)
    for strategy, members in groups.items():
        members.sort(key=lambda r: r.seed)
        for a, b in zip(members, members[1:]):
            if a.seed == b.seed:
                raise CompareError(f"two runs with selection_strategy={strategy} and seed={a.seed}: "
                                   f"{a.path} and {b.path}; pass only one of them")
    datasets = {json.dumps(r.config.get("datasets")) for r in runs}
    if len(datasets) > 1:
        warnings.warn(f"runs use different datasets ({', '.join(sorted(datasets))}); comparing them anyway")
    return groups


def is_eval_metric(key: str) -> bool:
    """Metrics measured at eval time: names containing 'eval' or under haiku/, jeopardy/, win_rate/."""
    return "eval" in key or key.split("/", 1)[0] in EVAL_PREFIXES


def default_metrics(runs: Sequence[Run]) -> List[str]:
    """Eval metrics logged (in some line of metrics.jsonl) by every run, sorted."""
    keys = [{k for rec in run.records for k in rec if is_eval_metric(k)} for run in runs]
    return sorted(set.intersection(*keys)) if keys else []


def lower_is_better(metric: str) -> bool:
    """Direction of a metric: lower is better for losses, wrong-answer rates and syllable distances."""
    name = metric.lower()
    return any(word in name for word in LOWER_IS_BETTER_WORDS)


def metric_series(records: Sequence[Dict[str, Any]], metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """(labels, values) of `metric`, sorted by labels, from the records holding a finite value of it.
    A label count logged twice (a resumed run repeats its last eval) keeps the later record."""
    by_label: Dict[float, float] = {}
    for rec in records:
        value = rec.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_label[float(rec["labels"])] = float(value)
    labels = np.array(sorted(by_label), dtype=float)
    return labels, np.array([by_label[x] for x in labels], dtype=float)


def align(series: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """Seeds on one x axis: the union of their label counts inside the range all of them cover, each
    seed linearly interpolated there (never extrapolated). Returns (labels, values[seed, point])."""
    lo = max(x[0] for x, _ in series)
    hi = min(x[-1] for x, _ in series)
    if lo > hi:
        raise CompareError(f"seeds cover disjoint label ranges ({[(x[0], x[-1]) for x, _ in series]})")
    grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in series]))
    return grid, np.stack([np.interp(grid, x, y) for x, y in series])


def curves(groups: Dict[str, List[Run]], metric: str) -> Dict[str, Curve]:
    """strategy -> its mean learning curve for `metric` (see `Curve`, `align`), from `group_runs` output.
    A run without any finite value of the metric is left out with a warning; so is a strategy left without runs."""
    out = {}
    for strategy, members in groups.items():
        kept, series = [], []
        for run in members:
            labels, values = metric_series(run.records, metric)
            if len(labels) == 0:
                warnings.warn(f"{run.path}: no finite value of {metric}; left out of that metric")
                continue
            kept.append(run)
            series.append((labels, values))
        if not series:
            continue
        grid, values = align(series)
        if any(x[-1] > grid[-1] or x[0] < grid[0] for x, _ in series):
            warnings.warn(f"{strategy}, {metric}: seeds cover different label ranges; the curve spans "
                          f"{grid[0]:g}..{grid[-1]:g}, the range all of them cover")
        std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(grid))
        out[strategy] = Curve(labels=grid, mean=values.mean(axis=0), std=std,
                              finals=[float(y[-1]) for _, y in series], seeds=[r.seed for r in kept])
    return out


def auc(labels: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under values(labels) divided by the label range: the curve's mean value, in the
    metric's unit. A single point is its own mean."""
    if len(labels) == 1:
        return float(values[0])
    area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(labels)))
    return area / float(labels[-1] - labels[0])


def _reaches(value: float, target: float, lower_better: bool) -> bool:
    # The tolerance absorbs rounding when a strategy's mean curve ends exactly at its own final mean.
    tol = 1e-12 * max(1.0, abs(target))
    return value <= target + tol if lower_better else value >= target - tol


def labels_to_reach(labels: np.ndarray, values: np.ndarray, target: float, lower_better: bool) -> Optional[float]:
    """First label count at which the curve reaches `target` (<= when lower is better, else >=),
    linearly interpolated between eval points; None if it never does."""
    if _reaches(values[0], target, lower_better):
        return float(labels[0])
    for i in range(1, len(labels)):
        if _reaches(values[i], target, lower_better):
            x0, x1, y0, y1 = labels[i - 1], labels[i], values[i - 1], values[i]
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return None


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1 (scipy is not a dependency)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only below the mean of the beta distribution; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (real, > 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b): (t, Welch-Satterthwaite df, two-sided p).
    Needs >= 2 values per side. With zero spread on both sides t is 0 (p 1) for equal means, else
    +-inf (p 0); df is then NaN."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_t_test needs >= 2 values per side, got {len(a)} and {len(b)}")
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    diff = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return (0.0, float("nan"), 1.0) if diff == 0 else (math.copysign(math.inf, diff), float("nan"), 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, float(df), t_two_sided_p(t, float(df))


def resolve_baseline(groups: Dict[str, Sequence[Run]], requested: Optional[str]) -> Optional[str]:
    """The requested baseline among the strategies of `groups` (strategy -> runs; an error if none matches),
    else the first of DEFAULT_BASELINES present, else None."""
    if requested is not None:
        match = [s for s, runs in groups.items() if same_strategy(s, requested, runs)]
        if not match:
            raise CompareError(f"--baseline {requested}: no run has that strategy; "
                               f"strategies: {', '.join(sorted(groups))}")
        return match[0]
    return next((s for s in DEFAULT_BASELINES if s in groups), None)


def comparison_table(metric_curves: Dict[str, Curve], metric: str, baseline: Optional[str]) -> List[Dict[str, Any]]:
    """One row per strategy (baseline first, then by name) for `metric`. Keys: metric, direction,
    strategy, n_seeds, final_mean, final_std (NaN with one seed), auc, labels_to_reach (None = never;
    absent without a baseline), welch_t, welch_df, p_value (absent unless both sides have >= 2 seeds
    and the row is not the baseline), first_label, last_label."""
    lower = lower_is_better(metric)
    base = metric_curves.get(baseline) if baseline is not None else None
    target = float(np.mean(base.finals)) if base is not None else None
    rows = []
    for strategy in sorted(metric_curves, key=lambda s: (s != baseline, s)):
        c = metric_curves[strategy]
        row: Dict[str, Any] = {
            "metric": metric, "direction": "lower" if lower else "higher", "strategy": strategy,
            "n_seeds": len(c.finals), "final_mean": float(np.mean(c.finals)),
            "final_std": float(np.std(c.finals, ddof=1)) if len(c.finals) > 1 else float("nan"),
            "auc": auc(c.labels, c.mean), "first_label": float(c.labels[0]), "last_label": float(c.labels[-1])}
        if target is not None:
            row["labels_to_reach"] = labels_to_reach(c.labels, c.mean, target, lower)
            if strategy != baseline and len(c.finals) > 1 and len(base.finals) > 1:
                row["welch_t"], row["welch_df"], row["p_value"] = welch_t_test(c.finals, base.finals)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("metric", "direction", "strategy", "n_seeds", "final_mean", "final_std", "auc", "labels_to_reach",
               "welch_t", "welch_df", "p_value", "first_label", "last_label")


def _csv_cell(row: Dict[str, Any], key: str) -> str:
    if key == "labels_to_reach" and key in row and row[key] is None:
        return "never"
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    """comparison.csv: CSV_COLUMNS, full-precision numbers, empty where undefined, 'never' for unreached."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row, k) for k in CSV_COLUMNS])
    return buf.getvalue()


def _num(value: Optional[float], fmt: str = ".4g") -> str:
    return "" if value is None or math.isnan(value) else format(value, fmt)


def markdown_report(rows: Sequence[Dict[str, Any]], groups: Dict[str, List[Run]], baseline: Optional[str]) -> str:
    """comparison.md: how the numbers were computed, then one table per metric."""
    counts = ", ".join(f"{s} ({len(m)} seeds)" for s, m in sorted(groups.items()))
    lines = [
        "# Run comparison", "",
        f"{sum(len(m) for m in groups.values())} runs: {counts}. "
        f"Baseline: {baseline or 'none (no uniform/uniref runs; pass --baseline)'}.", "",
        "- final: each seed's last eval value, mean ± sample std over seeds (n seeds).",
        "- curves: mean ± 1 sample std over seeds against labels, on the label counts inside the range "
        "all seeds cover.",
        "- AUC: trapezoid of the mean curve over labels divided by the label range (the curve's mean value).",
        "- labels to reach: first label count at which the mean curve reaches the baseline's final mean "
        "(linear interpolation; 'never' if it does not).",
        "- Welch t, p: Welch's t-test of final values, strategy minus baseline (t > 0: higher final mean), "
        "two-sided p; only when both have >= 2 seeds.",
    ]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        metric_rows = [r for r in rows if r["metric"] == metric]
        lines += ["", f"## {metric} ({metric_rows[0]['direction']} is better)", "",
                  "| strategy | seeds | final | AUC | labels to reach baseline | Welch t | p |",
                  "|---|---|---|---|---|---|---|"]
        for r in metric_rows:
            final = _num(r["final_mean"]) + (f" ± {_num(r['final_std'])}" if r["n_seeds"] > 1 else "")
            reach = "" if "labels_to_reach" not in r else (
                "never" if r["labels_to_reach"] is None else _num(r["labels_to_reach"], ".1f"))
            lines.append(f"| {r['strategy']} | {r['n_seeds']} | {final} | {_num(r['auc'])} | {reach} "
                         f"| {_num(r.get('welch_t'), '.3g')} | {_num(r.get('p_value'), '.3g')} |")
    return "\n".join(lines) + "\n"


def plot_filename(metric: str) -> str:
    """A file name for the metric's plot: characters other than letters, digits, '.', '-', '_' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", metric) + ".png"


def plot_metric(metric_curves: Dict[str, Curve], metric: str, baseline: Optional[str], strategies: Sequence[str],
                path: str) -> None:
    """PNG of every strategy's mean curve with its +-1 std band; colours follow `strategies` so they
    match across metrics; a dotted line marks the baseline's final mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in sorted(metric_curves, key=lambda s: (s != baseline, s)):
        c = metric_curves[strategy]
        colour = colours(list(strategies).index(strategy) % 10)
        ax.plot(c.labels, c.mean, marker="o", markersize=3, color=colour, label=f"{strategy} (n={len(c.finals)})")
        ax.fill_between(c.labels, c.mean - c.std, c.mean + c.std, color=colour, alpha=0.2, linewidth=0)
    if baseline in metric_curves:
        ax.axhline(float(np.mean(metric_curves[baseline].finals)), color="grey", linestyle=":", linewidth=1,
                   label=f"{baseline} final mean")
    ax.set_xlabel("labels")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better; band: ±1 std over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories or sweep directories holding runs at any depth")
    parser.add_argument("--out", required=True, help="directory for the PNGs, comparison.md and comparison.csv")
    parser.add_argument("--metrics", help="comma-separated metric names (default: eval metrics logged by every run)")
    parser.add_argument("--baseline", help="strategy to compare against (default: uniform, else uniref)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also compare runs without summary.json (running or stopped), their last eval as final")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.paths, args.include_unfinished)
        groups = group_runs(runs)
        strategies = sorted(groups)
        baseline = resolve_baseline(groups, args.baseline)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else default_metrics(runs)
        if not metrics:
            raise CompareError("no eval metric is logged by every run; name some with --metrics")
        os.makedirs(args.out, exist_ok=True)
        rows = []
        for metric in metrics:
            metric_curves = curves(groups, metric)
            if not metric_curves:
                raise CompareError(f"metric {metric}: no run logged a finite value of it")
            rows += comparison_table(metric_curves, metric, baseline)
            plot_metric(metric_curves, metric, baseline, strategies, os.path.join(args.out, plot_filename(metric)))
    except CompareError as e:
        parser.error(str(e))
    report = markdown_report(rows, groups, baseline)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "comparison.csv"), "w", newline="") as f:
        f.write(csv_text(rows))
    print(report, end="")
    return 0


if __name__ == "__main__":
    # one line per warning on the terminal, not the warnings module's file:line and source echo
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    sys.exit(main())
