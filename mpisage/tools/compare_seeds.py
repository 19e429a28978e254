"""`python -m mpisage.tools.compare --methods A,B --seeds N [--reference A] [--target 0.8,0.85] ...`: every method on the
same seeds, summarised as means with 95% t-intervals over the seeds.

Runs: method M with seed s runs in OUT/M/seed<s> with `seed=s resume=auto`. Seeds are paired: the data partition
and the initial split model derive from `seed` alone (mpisage.runtime.world: `derive_seed(seed, "init", 1)` for the
partition, `derive_seed(seed, "init")` for the weights, built client, server, then auxiliary model, so neither the
algorithm nor aux_model changes them), so seed s gives every method the same clients and starting weights. What
differs is what the algorithm itself draws (batch order as its steps consume the per-client streams, GAS schedules).
A run whose metrics.h5 already holds all its `rounds` (or reached `comm_threshold_mb`) is not launched again;
an interrupted one is relaunched with resume=auto and continues from its newest checkpoint (or starts afresh
when it had none). Relaunching a finished run with resume=auto is avoided on purpose: a run stopped by the
communication budget would train one more round.

Statistics (scipy.stats): for every figure, the mean over seeds and the two-sided 95% t-interval
mean +- t_{0.975, n-1} * s / sqrt(n) (s with ddof=1). Time to a target counts only the seeds that reached it (the
table says k/N); paired differences are method minus reference on the same seed, over the seeds both have (for a
time to target: the seeds where both reached it), then the same t-interval of the differences.

Outputs next to the runs: OUT/summary.md (the reproducing command and three tables), OUT/summary.csv (one row per
method x figure: n, mean, interval), OUT/per_seed.csv (every run's own figures) and OUT/accuracy_mean_ci.png.
"""
from __future__ import annotations

import csv
import math
import os
import shlex
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from mpisage.config import read_stored_config  # noqa: E402
from mpisage.runtime.metrics import GIB, read_attrs, read_dataset, read_rounds, run_finished  # noqa: E402
CONFIDENCE = 0.95
# Per-target figures: (key, metrics column, scale, label). simulated_time exists for asynchronous (GAS) runs only.
TO_TARGET = [("gib", "comm_bytes", 1 / GIB, "GiB"), ("wall_s", "wall_time", 1.0, "wall s"),
             ("sim_s", "simulated_time", 1.0, "simulated s")]
# Curve axes of the figure: (metrics column, scale, x label).
AXES = [("comm_bytes", 1 / GIB, "communication load (GiB, paper figure)"), ("wall_time", 1.0, "wall time (s)"),
        ("simulated_time", 1.0, "simulated time (s, straggler clock)")]
GRID_POINTS = 200


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its two-sided t-interval; low/high are NaN for n < 2 (no spread to estimate)."""
    n: int
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan)
    sem = float(stats.sem(x))              # s / sqrt(n), ddof=1
    if sem == 0:                           # identical values: scipy's interval of a zero scale is NaN
        return Interval(n, mean, mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(n, mean, float(low), float(high))


def t_band(curves: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise mean and t-interval half-width of [seeds, points] (half-width NaN for one seed)."""
    n = curves.shape[0]
    mean = curves.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, stats.t.ppf(0.5 + confidence / 2, n - 1) * stats.sem(curves, axis=0)


def first_reached(acc: np.ndarray, target: float) -> int | None:
    """Index of the first evaluation with accuracy >= target, or None."""
    hit = np.flatnonzero(np.asarray(acc) >= target)
    return int(hit[0]) if len(hit) else None


def seed_figures(run_dir: str, targets: list[float]) -> dict:
    """One run's own figures: rounds, test images per evaluation, final and best accuracy, and per target the
    GiB / wall seconds / simulated seconds at the first evaluation that reached it (None: never reached, or no
    such clock)."""
    path = os.path.join(run_dir, "metrics.h5")
    r = read_rounds(path)
    acc = np.asarray(r["test_acc"], float)
    test_samples = read_dataset(path, "test_samples")
    if test_samples is None:      # files written before test_samples was recorded: the config's eval.samples
        test_samples = read_stored_config(read_attrs(path).get("config", "")).get("eval", {}).get("samples")
    out = {"rounds": int(len(acc)), "test_samples": None if test_samples is None else int(test_samples),
           "final_acc": float(acc[-1]), "best_acc": float(acc.max())}
    for target in targets:
        i = first_reached(acc, target)
        for key, column, scale, _ in TO_TARGET:
            out[f"{key}_to_{target:g}"] = (float(r[column][i]) * scale
                                           if i is not None and column in r else None)
    return out


def quantities(targets: list[float], simulated: bool) -> list[tuple[str, str, float | None]]:
    """(figure key, label, target) in table order."""
    out = [("final_acc", "final test acc", None), ("best_acc", "best test acc", None)]
    for target in targets:
        out += [(f"{key}_to_{target:g}", f"{label} to {target:g}", target) for key, _, _, label in TO_TARGET
                if key != "sim_s" or simulated]
    return out


@dataclass
class Summary:
    methods: list[str]
    targets: list[float]
    reference: str | None
    per_seed: dict[str, dict[int, dict]]            # method -> seed -> seed_figures
    stats: dict[str, dict[str, Interval]]           # method -> figure -> interval over its seeds
    reached: dict[str, dict[str, tuple[int, int]]]  # method -> figure -> (seeds that reached, seeds run)
    diffs: dict[str, dict[str, Interval]]           # method -> figure -> interval of (method - reference) pairs
    simulated: bool

    @property
    def figures(self) -> list[tuple[str, str, float | None]]:
        return quantities(self.targets, self.simulated)


def summarize_seeds(runs: dict[str, dict[int, str]], targets: list[float], reference: str | None = None) -> Summary:
    """`runs`: method -> seed -> run_dir (each holding metrics.h5). Methods keep the dict's order."""
    per_seed = {m: {s: seed_figures(d, targets) for s, d in sorted(seeds.items())} for m, seeds in runs.items()}
    simulated = any(v is not None for figs in per_seed.values() for f in figs.values()
                    for k, v in f.items() if k.startswith("sim_s_to_"))
    keys = [k for k, _, _ in quantities(targets, simulated)]
    summary = Summary(list(runs), list(targets), reference, per_seed, {}, {}, {}, simulated)
    for m, figs in per_seed.items():
        summary.stats[m], summary.reached[m] = {}, {}
        for key in keys:
            values = [f[key] for f in figs.values() if f[key] is not None]
            summary.stats[m][key] = t_interval(values)
            summary.reached[m][key] = (len(values), len(figs))
    if reference is not None:
        if reference not in per_seed:
            raise ValueError(f"reference method {reference!r} is not among the methods {list(per_seed)}")
        ref = per_seed[reference]
        for m, figs in per_seed.items():
            if m == reference:
                continue
            summary.diffs[m] = {}
            for key in keys:
                pairs = [figs[s][key] - ref[s][key] for s in figs
                         if s in ref and figs[s][key] is not None and ref[s][key] is not None]
                summary.diffs[m][key] = t_interval(pairs)
    return summary


# ------------------------------------------------------------------ tables
def _digits(key: str) -> int:
    return 4 if "acc" in key else 3 if key.startswith("gib") else 1


def format_interval(iv: Interval, digits: int) -> str:
    if iv.n == 0:
        return "-"
    if iv.n == 1:
        return f"{iv.mean:.{digits}f} (n=1, no interval)"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def test_images(figs: dict[int, dict]) -> str:
    counts = sorted({f["test_samples"] for f in figs.values() if f["test_samples"] is not None})
    missing = any(f["test_samples"] is None for f in figs.values())
    if not counts:
        return "whole test set (size not recorded)"
    text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return text + (" (some not recorded)" if missing else "")


def eval_standard_error(summary: Summary, method: str) -> str:
    """The binomial standard error sqrt(p(1-p)/n) of one evaluation at the mean final accuracy: the noise of
    measuring an accuracy on n test images, apart from the seed-to-seed spread."""
    counts = [f["test_samples"] for f in summary.per_seed[method].values() if f["test_samples"]]
    p = summary.stats[method]["final_acc"].mean
    if not counts or not 0 <= p <= 1:
        return "-"
    return f"{math.sqrt(p * (1 - p) / min(counts)):.4f}"


def format_summary(summary: Summary) -> str:
    pct = f"{CONFIDENCE:.0%}"
    lines = [f"Test accuracy over seeds: mean [{pct} t-interval]; each accuracy measured once per round on the "
             f"'test images' column's count (eval s.e.: the binomial standard error of one such measurement at "
             f"the mean final accuracy).", "",
             "| method | seeds | rounds | test images | eval s.e. | final test acc | best test acc |",
             "|---|---|---|---|---|---|---|"]
    for m in summary.methods:
        figs = summary.per_seed[m]
        rounds = sorted({f["rounds"] for f in figs.values()})
        rounds_text = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
        lines.append(f"| {m} | {len(figs)} ({', '.join(map(str, figs))}) | {rounds_text} | {test_images(figs)} | "
                     f"{eval_standard_error(summary, m)} | {format_interval(summary.stats[m]['final_acc'], 4)} | "
                     f"{format_interval(summary.stats[m]['best_acc'], 4)} |")
    clocks = [(key, label) for key, _, _, label in TO_TARGET if key != "sim_s" or summary.simulated]
    lines += ["", f"To each target test accuracy (first evaluation at or above it): mean [{pct} t-interval] over the "
              f"seeds that reached it.", "",
              "| method | target | reached | " + " | ".join(label for _, label in clocks) + " |",
              "|---|---|---|" + "---|" * len(clocks)]
    for m in summary.methods:
        for target in summary.targets:
            k, n = summary.reached[m][f"gib_to_{target:g}"]
            cells = [format_interval(summary.stats[m][f"{key}_to_{target:g}"], _digits(key)) for key, _ in clocks]
            lines.append(f"| {m} | {target:g} | {k}/{n} seeds | " + " | ".join(cells) + " |")
    if summary.reference is not None and summary.diffs:
        lines += ["", f"Paired differences, method minus {summary.reference} on the same seed: mean [{pct} "
                  f"t-interval] over the pairs (for a figure to a target: the seeds where both reached it).", "",
                  "| method | figure | pairs | difference |", "|---|---|---|---|"]
        for m, diffs in summary.diffs.items():
            for key, label, _ in summary.figures:
                lines.append(f"| {m} | {label} | {diffs[key].n} | {format_interval(diffs[key], _digits(key))} |")
    return "\n".join(lines)


CSV_FIELDS = ["method", "figure", "target", "reference", "n", "seeds", "mean", "ci_low", "ci_high", "half_width",
              "test_images"]


def summary_rows(summary: Summary) -> list[dict]:
    """Long form: one row per (method, figure), then one per (method, paired difference)."""
    rows = []
    for m in summary.methods:
        images = test_images(summary.per_seed[m])
        for key, _, target in summary.figures:
            iv = summary.stats[m][key]
            rows.append({"method": m, "figure": key, "target": "" if target is None else target, "reference": "",
                         "n": iv.n, "seeds": summary.reached[m][key][1], "mean": iv.mean, "ci_low": iv.low,
                         "ci_high": iv.high, "half_width": iv.half_width, "test_images": images})
    for m, diffs in summary.diffs.items():
        for key, _, target in summary.figures:
            iv = diffs[key]
            rows.append({"method": m, "figure": key + "_minus_reference", "target": "" if target is None else target,
                         "reference": summary.reference, "n": iv.n, "seeds": len(summary.per_seed[m]),
                         "mean": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "half_width": iv.half_width,
                         "test_images": test_images(summary.per_seed[m])})
    return rows


def write_summary(summary: Summary, out: str, command: str, notes: list[str] = ()) -> list[str]:
    """OUT/summary.md, OUT/summary.csv and OUT/per_seed.csv; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, name) for name in ("summary.md", "summary.csv", "per_seed.csv")]
    with open(paths[0], "w") as f:
        f.write(f"Reproduce with:\n\n```\n{command}\n```\n\n{format_summary(summary)}\n")
        if notes:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(summary_rows(summary))
    keys = ["rounds", "test_samples"] + [k for k, _, _ in summary.figures]
    with open(paths[2], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", *keys])
        w.writeheader()
        for m, figs in summary.per_seed.items():
            for s, fig in figs.items():
                w.writerow({"method": m, "seed": s, **{k: "" if fig[k] is None else fig[k] for k in keys}})
    return paths


# ------------------------------------------------------------------ figure
def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]], points: int = GRID_POINTS):
    """Seeds' (x, accuracy) curves on one common x grid, so every point is the mean of all seeds: linear
    interpolation between evaluations; the grid starts at the latest first evaluation (no seed's accuracy is
    invented before it was measured) and ends at the last one, a seed that ended earlier holding its final
    accuracy (its final model keeps it at any larger budget). Returns grid, mean, half-width."""
    lo, hi = max(float(x[0]) for x, _ in curves), max(float(x[-1]) for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean, half = t_band(ys)
    return grid, mean, half


def plot_seeds(runs: dict[str, dict[int, str]], targets: list[float], out: str) -> str:
    """Mean test accuracy over seeds with its shaded 95% t-band, against paper-figure GiB, wall time and (when any
    run has it) simulated time. Seeds evaluate at different x (wall and simulated time vary from seed to seed,
    GiB varies with the partition), so each seed's curve is interpolated onto a common grid: the band at x is the
    spread of the accuracy the seeds had at the same cost x, the quantity the comparison is about. (Averaging by
    round index instead would pair rounds that cost different time, and for GAS a "round" is one global update.)"""
    data = {m: [read_rounds(os.path.join(d, "metrics.h5")) for _, d in sorted(seeds.items())]
            for m, seeds in runs.items()}
    axes_used = [a for a in AXES if a[0] != "simulated_time" or
                 any(a[0] in r for rs in data.values() for r in rs)]
    fig, axes = plt.subplots(1, len(axes_used), figsize=(5.5 * len(axes_used), 4.2), squeeze=False)
    for (column, scale, xlabel), ax in zip(axes_used, axes[0]):
        for i, (m, rs) in enumerate(data.items()):
            curves = [(np.asarray(r[column], float) * scale, np.asarray(r["test_acc"], float))
                      for r in rs if column in r]
            if not curves:
                continue
            grid, mean, half = mean_curve(curves)
            color = f"C{i}"
            ax.plot(grid, mean, color=color, label=f"{m} (n={len(curves)})")
            if len(curves) > 1:
                # drawn within [0, 1], where an accuracy lies (a t-interval of few seeds may reach past it)
                ax.fill_between(grid, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), color=color,
                                alpha=0.2, linewidth=0)
        for target in targets:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test accuracy (mean, {CONFIDENCE:.0%} t-band)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ------------------------------------------------------------------ running
def parse_seeds(seeds: int | None, seed_list: str | None) -> list[int]:
    """`--seeds N` -> 0..N-1; `--seed-list 3,5,8` -> those. Raises ValueError naming the problem."""
    if seed_list is not None:
        try:
            out = [int(s) for s in seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seed-list {seed_list!r} must be comma-separated integers (example: 0,1,2)") from None
        if not out or len(set(out)) != len(out):
            raise ValueError(f"--seed-list {seed_list!r} needs at least one seed and no repeats")
        if seeds is not None and seeds != len(out):
            raise ValueError(f"--seeds {seeds} disagrees with --seed-list {seed_list} ({len(out)} seeds); give one")
        return out
    if seeds is None or seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (got {seeds})")
    return list(range(seeds))


def seed_run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, method, f"seed{seed}")


def requested_config(overrides: list[str], method: str, seed: int, run_dir: str):
    """The config the run of (method, seed) will use, resolved as mpisage.run resolves it."""
    from mpisage.config import load_config, parse_args
    algorithm, *own = method.split(":")
    config_file, keys = parse_args([*overrides, *own, f"algorithm={algorithm}", f"seed={seed}", f"run_dir={run_dir}",
                                    "resume=auto"])
    return load_config(config_file, keys)


def run_state(run_dir: str, cfg) -> tuple[str, str]:
    """("finished" | "partial" | "new" | "different", why) for the run in run_dir against the requested config."""
    from mpisage.runtime.checkpoint import config_differences
    path = os.path.join(run_dir, "metrics.h5")
    if not os.path.isfile(path):
        return "new", ""
    try:
        stored = str(read_attrs(path)["config"])
        r = read_rounds(path)
    except (OSError, KeyError) as e:
        return "partial", f"unreadable metrics.h5 ({e})"
    differences = config_differences(stored, cfg)
    if differences:
        return "different", "; ".join(differences)
    done = len(r.get("test_acc", ()))
    if done and run_finished(done, r["comm_bytes"][-1], cfg.rounds, cfg.comm_threshold_mb):
        return "finished", f"{done} rounds"
    return "partial", f"{done} rounds of {cfg.rounds}"


def main_seeds(args, overrides: list[str], argv: list[str], methods: list[str], targets: list[float],
               run_method) -> int:
    """`run_method(method, ranks, overrides, run_dir) -> exit code` launches one run (mpisage.tools.compare's)."""
    from mpisage.config import ConfigError
    try:
        seeds = parse_seeds(args.seeds, args.seed_list)
    except ValueError as e:
        print(f"[compare] {e}", file=sys.stderr)
        return 2
    named = [o for m in methods for o in [*overrides, *m.split(":")[1:]]
             if "=" in o and o.split("=", 1)[0].strip().lstrip("+") == "seed"]
    if named:
        print(f"[compare] {named[0]} cannot be combined with --seeds/--seed-list: every run takes its seed from "
              f"there (drop the seed= override)", file=sys.stderr)
        return 2
    reference = args.reference if args.reference is not None else methods[0]
    if reference not in methods:
        print(f"[compare] --reference {reference} is not one of --methods {','.join(methods)}", file=sys.stderr)
        return 2

    done: dict[str, dict[int, str]] = {m: {} for m in methods}
    failed = []
    # seed-major: a comparison stopped part-way has every method on the seeds it finished (paired figures)
    for seed in seeds:
        for method in methods:
            run_dir = seed_run_dir(args.out, method, seed)
            try:
                cfg = requested_config(overrides, method, seed, run_dir)
            except ConfigError as e:
                print(f"[compare] {method}: {e}", file=sys.stderr)
                return 2
            state, why = run_state(run_dir, cfg)
            if state == "different":
                failed.append(f"{method} seed {seed}: {run_dir} holds a run with other settings ({why}); use "
                              f"another --out or delete that run_dir")
                print(f"[compare] {failed[-1]}", file=sys.stderr, flush=True)
                continue
            if state == "finished":
                print(f"[compare] {method} seed {seed}: reusing the finished run in {run_dir} ({why})", flush=True)
            else:
                if state == "partial":
                    print(f"[compare] {method} seed {seed}: continuing {run_dir} ({why}) with resume=auto", flush=True)
                rc = run_method(method, args.ranks, [*overrides, f"seed={seed}", "resume=auto"], run_dir)
                if rc == 0 and run_state(run_dir, cfg)[0] != "finished":
                    rc = -1     # exited 0 without finishing (e.g. preempted: rerun the same command to continue)
                if rc != 0:
                    failed.append(f"{method} seed {seed} did not finish (exit code {rc}); rerun the same command "
                                  f"to continue it")
                    print(f"[compare] {failed[-1]}", file=sys.stderr, flush=True)
                    continue
            done[method][seed] = run_dir
    done = {m: seeds_done for m, seeds_done in done.items() if seeds_done}
    command = "python -m mpisage.tools.compare " + shlex.join(argv)
    if not done:
        print("[compare] no run finished: nothing to summarise", file=sys.stderr)
        return 1
    summary = summarize_seeds(done, targets, reference if reference in done else None)
    paths = write_summary(summary, args.out, command, failed)
    paths.append(plot_seeds(done, targets, os.path.join(args.out, "accuracy_mean_ci.png")))
    print(f"\n{command}\n\n{format_summary(summary)}")
    for note in failed:
        print(f"[compare] {note}", file=sys.stderr)
    print(f"[compare] wrote {', '.join(paths)}")
    return 1 if failed else 0
