"""`mpisage.tools.compare` as a library, on hand-made metrics files (no mpirun): the summary figures, the written table
and the figure."""
import csv
import json
import os

import numpy as np
import pytest

from mpisage.tools.compare import NOT_REACHED, is_complete, plot_comparison, summarize, write_table
from mpisage.runtime.metrics import MetricsFile

GIB = 1024 ** 3


def fake_run(run_dir, accs, gibs, round_seconds, config="rounds: 12\ncomm_threshold_mb: 204800.0\n"):
    """A run_dir whose metrics.h5 holds one round per entry; comm_bytes is cumulative, as a real run writes it."""
    m = MetricsFile(os.path.join(run_dir, "metrics.h5"),
                    {"algorithm": json.dumps({"algorithm": "x"}), "config": config})
    wall = 0.0
    for acc, gib, s in zip(accs, gibs, round_seconds):
        wall += s
        m.append({"test_acc": acc, "test_loss": 1.0 - acc, "comm_bytes": int(gib * GIB),
                  "wire_bytes": int(gib * GIB) + 100, "wall_time": wall, "round_seconds": s})
    m.close()
    return str(run_dir)


@pytest.fixture
def runs(tmp_path):
    return {
        # reaches 0.8 at round 2 (1.5 GiB), then drops: best != final
        "fast": fake_run(tmp_path / "fast", [0.5, 0.82, 0.9, 0.85], [0.5, 1.5, 2.5, 3.5], [10.0, 2.0, 4.0, 3.0]),
        # never reaches 0.8
        "slow": fake_run(tmp_path / "slow", [0.3, 0.6, 0.7], [1.0, 2.0, 3.0], [5.0, 6.0, 8.0]),
        # a single round: its only round time is the median
        "one": fake_run(tmp_path / "one", [0.8], [0.25], [7.5]),
    }


def test_summarize(runs):
    rows = {r["method"]: r for r in summarize(runs, target=0.8)}
    assert list(rows) == ["fast", "slow", "one"]
    fast, slow, one = rows["fast"], rows["slow"], rows["one"]
    assert fast["rounds"] == 4 and slow["rounds"] == 3 and one["rounds"] == 1
    assert fast["best_acc"] == pytest.approx(0.9) and fast["final_acc"] == pytest.approx(0.85)
    assert fast["gib_to_target"] == pytest.approx(1.5)      # first round >= target, not the best one
    assert fast["total_gib"] == pytest.approx(3.5)
    assert fast["median_round_s"] == pytest.approx(3.0)     # median of 2, 4, 3: the 10 s first round left out
    assert slow["gib_to_target"] == NOT_REACHED
    assert slow["median_round_s"] == pytest.approx(7.0)
    assert one["gib_to_target"] == pytest.approx(0.25)      # reaching the target exactly counts
    assert one["median_round_s"] == pytest.approx(7.5)


def test_write_table(runs, tmp_path):
    rows = summarize(runs, target=0.8)
    md, csv_path = tmp_path / "out" / "results.md", tmp_path / "out" / "results.csv"
    command = "python -m mpisage.tools.compare --methods fast,slow,one --target 0.8 rounds=4"
    write_table(rows, str(md), str(csv_path), command)
    text = md.read_text()
    assert command in text
    assert text.index(command) < text.index("| method")      # the command sits above the table
    assert "| fast | 4 | 0.9000 | 0.8500 | 1.500 | 3.500 | 3.00 |" in text
    assert f"| slow | 3 | 0.7000 | 0.7000 | {NOT_REACHED} | 3.000 | 7.00 |" in text
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["fast", "slow", "one"]
    assert float(table[0]["gib_to_target"]) == pytest.approx(1.5)
    assert table[1]["gib_to_target"] == NOT_REACHED
    assert float(table[2]["median_round_s"]) == pytest.approx(7.5)


def test_plot_comparison_writes_a_png(runs, tmp_path):
    out = tmp_path / "accuracy_vs_gib.png"
    plot_comparison(runs, 0.8, str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_is_complete(tmp_path):
    assert is_complete(fake_run(tmp_path / "all", [0.1, 0.2], [1, 2], [1, 1], config="rounds: 2\ncomm_threshold_mb: 1e9\n"))
    # stopped early by the communication threshold (2 GiB >= 1024 MiB)
    assert is_complete(fake_run(tmp_path / "thr", [0.1, 0.2], [1, 2], [1, 1], config="rounds: 9\ncomm_threshold_mb: 1024\n"))
    # interrupted: fewer rounds than asked and under the threshold
    assert not is_complete(fake_run(tmp_path / "cut", [0.1, 0.2], [1, 2], [1, 1], config="rounds: 9\ncomm_threshold_mb: 1e9\n"))
    assert not is_complete(str(tmp_path / "missing"))


# ------------------------------------------------------------------ several seeds (mpisage.tools.compare_seeds)
from mpisage.tools.compare import main as compare_main  # noqa: E402
from mpisage.tools.compare_seeds import (format_summary, mean_curve, parse_seeds, plot_seeds, run_state,  # noqa: E402
                                   summarize_seeds, t_interval, write_summary)

T_975_2 = 4.302652729911275     # t_{0.975, 2 d.o.f.}, from a printed t-table


def seeded_run(run_dir, accs, gibs, round_seconds, test_samples=None, simulated=None,
               config="rounds: 4\ncomm_threshold_mb: 204800.0\neval_samples: null\n"):
    m = MetricsFile(os.path.join(run_dir, "metrics.h5"), {"algorithm": json.dumps({"algorithm": "x"}), "config": config})
    if test_samples is not None:
        m.set("test_samples", test_samples)
    wall = 0.0
    for i, (acc, gib, s) in enumerate(zip(accs, gibs, round_seconds)):
        wall += s
        row = {"test_acc": acc, "comm_bytes": int(gib * GIB), "wall_time": wall, "round_seconds": s}
        if simulated is not None:
            row["simulated_time"] = simulated[i]
        m.append(row)
    m.close()
    return str(run_dir)


def test_t_interval_by_hand():
    iv = t_interval([0.80, 0.82, 0.84])
    # mean 0.82, s = 0.02, half-width t_{0.975,2} * s / sqrt(3) = 4.3027 * 0.02 / 1.7321 = 0.04968
    assert iv.n == 3 and iv.mean == pytest.approx(0.82)
    assert iv.half_width == pytest.approx(T_975_2 * 0.02 / 3 ** 0.5) and iv.half_width == pytest.approx(0.04968, abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((0.82 - 0.04968, 0.82 + 0.04968), abs=1e-5)
    # two values 1 and 3: s = sqrt(2), half-width t_{0.975,1} (12.706) * sqrt(2) / sqrt(2) = 12.706
    assert t_interval([1.0, 3.0]).half_width == pytest.approx(12.7062, abs=1e-4)
    one = t_interval([0.5])
    assert one.n == 1 and one.mean == 0.5 and np.isnan(one.low) and np.isnan(one.high)
    assert t_interval([]).n == 0
    same = t_interval([0.7, 0.7, 0.7])
    assert (same.low, same.mean, same.high) == pytest.approx((0.7, 0.7, 0.7))


@pytest.fixture
def seed_runs(tmp_path):
    """Two methods x three seeds, 1000 test images each. "a": final 0.80/0.82/0.84, reaches 0.8 on every seed
    (best != final on seed 0); "b": final 0.85/0.75/0.90, reaches 0.8 on seeds 0 and 2 only."""
    a = {0: seeded_run(tmp_path / "a" / "seed0", [0.5, 0.81, 0.80], [1, 2, 3], [2, 2, 2], test_samples=1000),
         1: seeded_run(tmp_path / "a" / "seed1", [0.6, 0.7, 0.82], [1, 2, 3], [3, 3, 3], test_samples=1000),
         2: seeded_run(tmp_path / "a" / "seed2", [0.8, 0.84, 0.84], [1, 2, 3], [1, 1, 1], test_samples=1000)}
    b = {0: seeded_run(tmp_path / "b" / "seed0", [0.7, 0.85], [0.5, 1.0], [1, 1], test_samples=1000),
         1: seeded_run(tmp_path / "b" / "seed1", [0.7, 0.75], [0.5, 1.0], [1, 1], test_samples=1000),
         2: seeded_run(tmp_path / "b" / "seed2", [0.9, 0.90], [0.5, 1.0], [1, 1], test_samples=1000)}
    return {"a": a, "b": b}


def test_summarize_seeds_by_hand(seed_runs):
    s = summarize_seeds(seed_runs, targets=[0.8, 0.95], reference="a")
    a, b = s.stats["a"], s.stats["b"]
    assert a["final_acc"].mean == pytest.approx(0.82)
    assert a["final_acc"].half_width == pytest.approx(T_975_2 * 0.02 / 3 ** 0.5)
    assert a["best_acc"].mean == pytest.approx((0.81 + 0.82 + 0.84) / 3)
    # GiB to 0.8: a reaches it at 2, 3, 1 GiB -> mean 2, s = 1, half-width t * 1 / sqrt(3)
    assert a["gib_to_0.8"].mean == pytest.approx(2.0)
    assert a["gib_to_0.8"].half_width == pytest.approx(T_975_2 / 3 ** 0.5)
    assert s.reached["a"]["gib_to_0.8"] == (3, 3)
    # wall seconds to 0.8 (cumulative round seconds at that round): 4, 9, 1
    assert a["wall_s_to_0.8"].mean == pytest.approx(14 / 3)
    # b reaches 0.8 on seeds 0 (1.0 GiB) and 2 (0.5 GiB) only; the mean is over those two
    assert s.reached["b"]["gib_to_0.8"] == (2, 3)
    assert b["gib_to_0.8"].n == 2 and b["gib_to_0.8"].mean == pytest.approx(0.75)
    # nobody reaches 0.95
    assert s.reached["a"]["gib_to_0.95"] == (0, 3) and b["gib_to_0.95"].n == 0
    assert not s.simulated and "sim_s_to_0.8" not in a
    # paired differences b - a on each seed: final 0.05, -0.07, 0.06
    d = s.diffs["b"]["final_acc"]
    diffs = np.array([0.85 - 0.80, 0.75 - 0.82, 0.90 - 0.84])
    assert d.n == 3 and d.mean == pytest.approx(diffs.mean())
    assert d.half_width == pytest.approx(T_975_2 * diffs.std(ddof=1) / 3 ** 0.5)
    # GiB to 0.8, paired only where both reached (seeds 0, 2): 1.0 - 2 = -1, 0.5 - 1 = -0.5 -> mean -0.75,
    # s = 0.25 * sqrt(2), half-width t_{0.975,1} (12.7062) * s / sqrt(2) = 12.7062 * 0.25
    g = s.diffs["b"]["gib_to_0.8"]
    assert g.n == 2 and g.mean == pytest.approx(-0.75) and g.half_width == pytest.approx(12.7062 * 0.25, abs=1e-3)
    assert "a" not in s.diffs


def test_paired_differences_use_common_seeds_only(tmp_path):
    # the reference lacks seed 2 (failed): the pairs are seeds 0 and 1, 0.9 - 0.8 and 0.7 - 0.8
    ref = {s: seeded_run(tmp_path / "r" / f"seed{s}", [acc], [1], [1]) for s, acc in ((0, 0.8), (1, 0.8))}
    other = {s: seeded_run(tmp_path / "o" / f"seed{s}", [acc], [1], [1]) for s, acc in ((0, 0.9), (1, 0.7), (2, 0.1))}
    s = summarize_seeds({"r": ref, "o": other}, [0.5], reference="r")
    assert s.diffs["o"]["final_acc"].n == 2 and s.diffs["o"]["final_acc"].mean == pytest.approx(0.0)
    assert s.stats["o"]["final_acc"].n == 3      # its own summary keeps all its seeds
    with pytest.raises(ValueError, match="reference method 'x'"):
        summarize_seeds({"r": ref}, [0.5], reference="x")


def test_simulated_time_to_target(tmp_path):
    runs = {"gas": {s: seeded_run(tmp_path / f"g{s}", [0.4, 0.6], [1, 2], [1, 1], simulated=sim)
                    for s, sim in ((0, [10.0, 20.0]), (1, [12.0, 30.0]))}}
    s = summarize_seeds(runs, [0.5])
    assert s.simulated and s.stats["gas"]["sim_s_to_0.5"].mean == pytest.approx(25.0)
    assert "simulated s" in format_summary(s)


def test_summary_files_and_table(seed_runs, tmp_path):
    s = summarize_seeds(seed_runs, targets=[0.8], reference="a")
    out = tmp_path / "out"
    md, summary_csv, per_seed_csv = write_summary(s, str(out), "python -m mpisage.tools.compare --seeds 3", ["a note"])
    text = open(md).read()
    assert "--seeds 3" in text and "- a note" in text
    # final accuracy of a: 0.8200 [0.8200 - 0.0497, 0.8200 + 0.0497]; measured on 1000 images, binomial s.e.
    # sqrt(0.82 * 0.18 / 1000) = 0.0121
    assert "| a | 3 (0, 1, 2) | 3 | 1000 | 0.0121 | 0.8200 [0.7703, 0.8697] |" in text
    assert "| b | 0.8 | 2/3 seeds | 0.750 [" in text
    assert "Paired differences, method minus a" in text
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    final_a = next(r for r in rows if r["method"] == "a" and r["figure"] == "final_acc")
    assert float(final_a["ci_low"]) == pytest.approx(0.82 - T_975_2 * 0.02 / 3 ** 0.5)
    assert final_a["n"] == "3" and final_a["test_images"] == "1000"
    gib_b = next(r for r in rows if r["method"] == "b" and r["figure"] == "gib_to_0.8")
    assert (gib_b["n"], gib_b["seeds"]) == ("2", "3")
    assert any(r["figure"] == "final_acc_minus_reference" and r["reference"] == "a" for r in rows)
    with open(per_seed_csv) as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 6
    b1 = next(r for r in per_seed if r["method"] == "b" and r["seed"] == "1")
    assert b1["gib_to_0.8"] == "" and float(b1["final_acc"]) == pytest.approx(0.75)


def test_test_images_fall_back_on_eval_samples(tmp_path):
    # a file written before test_samples was recorded: the config's eval_samples, else "not recorded"
    old = seeded_run(tmp_path / "old", [0.5], [1], [1], config="rounds: 1\ncomm_threshold_mb: 1.0\neval_samples: 500\n")
    none = seeded_run(tmp_path / "none", [0.5], [1], [1])
    s = summarize_seeds({"old": {0: old}, "none": {0: none}}, [0.9])
    assert s.per_seed["old"][0]["test_samples"] == 500
    assert "| none | 1 (0) | 1 | whole test set (size not recorded) | - | 0.5000 (n=1, no interval) |" in format_summary(s)


def test_mean_curve_interpolates_on_a_common_grid():
    # seed 0 evaluated at x = 0, 2, 4 on y = x/10; seed 1 at x = 1, 3 on y = x/10 + 0.1, then it ended
    curves = [(np.array([0.0, 2.0, 4.0]), np.array([0.0, 0.2, 0.4])), (np.array([1.0, 3.0]), np.array([0.2, 0.4]))]
    grid, mean, half = mean_curve(curves, points=7)
    assert grid == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])    # from seed 1's first evaluation on
    # both on their lines up to x = 3, then seed 1 holds its final 0.4
    assert mean == pytest.approx([0.15, 0.2, 0.25, 0.3, 0.35, (0.35 + 0.4) / 2, 0.4])
    # two seeds 0.1 apart: s = 0.1/sqrt(2), half-width t_{0.975,1} * s / sqrt(2) = 12.7062 * 0.05
    assert half[:5] == pytest.approx(np.full(5, 12.7062 * 0.05), abs=1e-3)
    assert half[-1] == pytest.approx(0.0)


def test_plot_seeds_writes_a_png(seed_runs, tmp_path):
    out = tmp_path / "curves.png"
    plot_seeds(seed_runs, [0.8], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_seeds():
    assert parse_seeds(3, None) == [0, 1, 2]
    assert parse_seeds(None, "5, 7,9") == [5, 7, 9]
    for seeds, seed_list, message in ((0, None, ">= 1"), (None, "1,x", "integers"), (None, "1,1", "no repeats"),
                                      (2, "1,2,3", "disagrees")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(seeds, seed_list)


def test_run_state(tmp_path):
    from mpisage.config import load_config
    run_dir = str(tmp_path / "fsl_sage" / "seed0")
    cfg = load_config(None, ["rounds=3", "seed=0", f"run_dir={run_dir}", "resume=auto"])
    from mpisage.config import to_yaml
    assert run_state(run_dir, cfg)[0] == "new"
    seeded_run(run_dir, [0.1, 0.2], [1, 2], [1, 1], config=to_yaml(cfg))
    assert run_state(run_dir, cfg) == ("partial", "2 rounds of 3")
    seeded_run(run_dir, [0.1, 0.2, 0.3], [1, 2, 3], [1, 1, 1], config=to_yaml(cfg))
    assert run_state(run_dir, cfg)[0] == "finished"
    # more rounds asked for: the finished run is continued (rounds may change on resume)
    more = load_config(None, ["rounds=5", "seed=0", f"run_dir={run_dir}", "resume=auto"])
    assert run_state(run_dir, more)[0] == "partial"
    # another learning rate: not the same run, never mixed in
    state, why = run_state(run_dir, load_config(None, ["rounds=3", "seed=0", "optim.lr=0.5", f"run_dir={run_dir}"]))
    assert state == "different" and "lr" in why


def test_compare_seeds_reuses_finished_runs_without_launching(tmp_path, capsys, monkeypatch):
    """The whole command on runs already finished: nothing is launched, the summary and plot are written."""
    from mpisage.tools.compare_seeds import requested_config, seed_run_dir
    from mpisage.config import to_yaml
    out = str(tmp_path / "cmp")
    for method, finals in (("fed_avg", (0.6, 0.7)), ("fsl_sage", (0.7, 0.9))):
        for seed, final in zip((4, 6), finals):
            run_dir = seed_run_dir(out, method, seed)
            cfg = requested_config(["rounds=2"], method, seed, run_dir)
            seeded_run(run_dir, [0.1, final], [1, 2], [1, 1], test_samples=10000, config=to_yaml(cfg))
    monkeypatch.setattr("mpisage.tools.compare.run_method", lambda *a: pytest.fail(f"launched {a}"))
    rc = compare_main(["--methods", "fed_avg,fsl_sage", "--seed-list", "4,6", "--reference", "fed_avg",
                       "--target", "0.65,0.8", "--out", out, "rounds=2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| fed_avg | 0.65 | 1/2 seeds |" in text and "| fsl_sage | 0.8 | 1/2 seeds |" in text
    # fsl_sage - fed_avg: 0.1 and 0.2 -> mean 0.15, s = 0.0707, half-width 12.7062 * 0.05
    assert "| fsl_sage | final test acc | 2 | 0.1500 [-0.4853, 0.7853] |" in text
    for name in ("summary.md", "summary.csv", "per_seed.csv", "accuracy_mean_ci.png"):
        assert os.path.isfile(os.path.join(out, name))


def test_compare_seeds_refuses_a_seed_override(tmp_path, capsys):
    assert compare_main(["--methods", "fed_avg", "--seeds", "2", "--out", str(tmp_path), "seed=3"]) == 2
    assert "seed=3 cannot be combined with --seeds" in capsys.readouterr().err
    assert compare_main(["--methods", "fed_avg", "--seeds", "2", "--reference", "gas", "--out", str(tmp_path)]) == 2
    assert "--reference gas is not one of --methods" in capsys.readouterr().err


def test_compare_seeds_relaunches_unfinished_runs_and_reports_failures(tmp_path, capsys, monkeypatch):
    """Seed 0 finished, seed 1 interrupted after 1 of 2 rounds, seed 2 fails: only seeds 1 and 2 are launched,
    each with its seed and resume=auto; the failure is reported (exit 1) and the others are summarised."""
    from mpisage.tools.compare_seeds import requested_config, seed_run_dir
    from mpisage.config import to_yaml
    out = str(tmp_path / "cmp")
    configs = {s: to_yaml(requested_config(["rounds=2"], "fed_avg", s, seed_run_dir(out, "fed_avg", s))) for s in range(3)}
    seeded_run(seed_run_dir(out, "fed_avg", 0), [0.5, 0.6], [1, 2], [1, 1], config=configs[0])
    seeded_run(seed_run_dir(out, "fed_avg", 1), [0.5], [1], [1], config=configs[1])
    launched = []

    def fake_run_method(method, ranks, overrides, run_dir):
        launched.append((method, ranks, overrides, run_dir))
        seed = int(run_dir[-1])
        if seed == 2:
            return 3
        seeded_run(run_dir, [0.5, 0.7], [1, 2], [1, 1], config=configs[seed])    # the resumed run finishes
        return 0
    monkeypatch.setattr("mpisage.tools.compare.run_method", fake_run_method)
    rc = compare_main(["--methods", "fed_avg", "--seeds", "3", "--ranks", "5", "--out", out, "rounds=2"])
    assert rc == 1
    assert [(m, r, o, d) for m, r, o, d in launched] == [
        ("fed_avg", 5, ["rounds=2", "seed=1", "resume=auto"], seed_run_dir(out, "fed_avg", 1)),
        ("fed_avg", 5, ["rounds=2", "seed=2", "resume=auto"], seed_run_dir(out, "fed_avg", 2))]
    captured = capsys.readouterr()
    assert "fed_avg seed 2 did not finish (exit code 3)" in captured.err
    assert "| fed_avg | 2 (0, 1) | 2 |" in captured.out and "0.6500 [" in captured.out
    assert "fed_avg seed 2 did not finish" in open(os.path.join(out, "summary.md")).read()
