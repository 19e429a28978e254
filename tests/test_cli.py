"""The job as users start it (`mpirun ... python -m mpisage.run`): bad input stops it before training with a
message naming the problem; a rank that raises takes the whole job down quickly with its rank and reason."""
import os
import subprocess
import time

from conftest import MPIRUN, PYTHON, ROOT


def _launch(n: int, args: list[str], env: dict | None = None, timeout: int = 120):
    start = time.monotonic()
    proc = subprocess.run([MPIRUN, "-n", str(n), PYTHON, "-m", "mpisage.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MPISAGE_TRACEBACK": "0", **(env or {})})
    return proc, time.monotonic() - start


def test_bad_config_exits_before_training(tmp_path):
    proc, _ = _launch(3, ["dataset.alpha=-1", f"run_dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert "dataset.alpha" in proc.stderr and "must be > 0" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.h5")


def test_too_few_ranks_is_explained(tmp_path):
    proc, _ = _launch(2, [f"run_dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert "at least 3 MPI ranks" in proc.stderr


def test_a_failing_rank_aborts_the_whole_job_quickly(tmp_path):
    from mpisage.data import write_fashion_mnist_fixture
    data = write_fashion_mnist_fixture(str(tmp_path / "data"), 300, 50)
    proc, seconds = _launch(4, [f"dataset.root={data}", "num_clients=3", "rounds=5", "batch_size=32",
                                "align_steps=2", f"run_dir={tmp_path}/run"],
                            env={"MPISAGE_INJECT_FAULT": "3:1"})
    assert proc.returncode != 0
    assert "rank 3 (client) failed" in proc.stderr and "fault injected" in proc.stderr
    assert "round    3/5" not in proc.stdout    # no round after the fault (round index 1) completed
    assert seconds < 60, f"the job took {seconds:.0f} s to die"
