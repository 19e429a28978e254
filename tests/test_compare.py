"""`mpisage.tools.compare` as a library, on hand-made metrics files (no mpirun): the summary figures, the written table
and the figure."""
import csv
import json
import os

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
