"""The job as users start it (`mpirun ... python -m mpisage.run`): bad input stops it before training with a
message naming the problem; a rank that raises takes the whole job down quickly with its rank and reason."""
import os
import subprocess
import time

from conftest import ROOT

from mpisage.runtime.environment import job_command


def _job(n: int, args: list[str], env: dict | None):
    argv, job_env = job_command(n, args)
    return argv, {**job_env, "MPISAGE_TRACEBACK": "0", **(env or {})}


def _launch(n: int, args: list[str], env: dict | None = None, timeout: int = 120):
    start = time.monotonic()
    argv, job_env = _job(n, args, env)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=job_env)
    return proc, time.monotonic() - start


def test_bad_config_exits_before_training(tmp_path):
    proc, _ = _launch(3, ["dataset.alpha=-1", f"run_dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert "dataset.alpha" in proc.stderr and "must be > 0" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.h5")


def test_a_yaml_syntax_error_is_one_line_printed_once(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: 3\noptim:\n  lr: [0.1\n")
    proc, _ = _launch(3, ["-c", str(broken), f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2
    assert proc.stderr.count("YAML syntax error at line") == 1 and str(broken) in proc.stderr, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr


def test_bad_inputs_found_at_start_up_are_rejected_before_training(tmp_path):
    """Problems that need the data, the rank layout or a checkpoint to be seen: each exits non-zero on every
    rank with a message naming it, before any round runs (one launch per case, 3 ranks)."""
    from mpisage.runtime.checkpoint import write_checkpoint
    from mpisage.data import write_fashion_mnist_fixture
    data = write_fashion_mnist_fixture(str(tmp_path / "data"), 60, 20)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_checkpoint(str(foreign), 0, {}, {"config": "lr: 0.5\n"}, keep=1)
    cases = [
        (["num_clients=100", f"dataset.root={data}"], "num_clients"),                 # more clients than samples
        (["dataset=cifar10", f"dataset.root={tmp_path}/nothing"], "cifar-10-batches-py"),   # missing data files
        ([f"dataset.root={data}", f"resume={foreign}/checkpoint_round000000.h5"], "another config"),
        ([f"dataset.root={data}", f"resume={tmp_path}/missing.h5"], "missing.h5"),
    ]
    for args, needle in cases:
        proc, seconds = _launch(3, args + [f"run_dir={tmp_path}/run"])
        assert proc.returncode != 0, args
        assert needle in proc.stderr, (args, proc.stderr[-500:])
        assert "round " not in proc.stdout, args
        assert seconds < 60


def test_too_few_ranks_is_explained(tmp_path):
    proc, _ = _launch(2, [f"run_dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert "at least 3 MPI ranks" in proc.stderr


def test_a_failing_rank_aborts_the_whole_job_quickly(tmp_path):
    from mpisage.data import write_fashion_mnist_fixture
    data = write_fashion_mnist_fixture(str(tmp_path / "data"), 300, 50)
    proc, seconds = _launch(4, [f"dataset.root={data}", "num_clients=3", "rounds=5", "batch_size=32",
                                "fsl.align_steps=2", f"run_dir={tmp_path}/run"],
                            env={"MPISAGE_INJECT_FAULT": "3:1"})
    assert proc.returncode != 0
    assert "rank 3 (client) failed" in proc.stderr and "fault injected" in proc.stderr
    assert "round    3/5" not in proc.stdout    # no round after the fault (round index 1) completed
    assert seconds < 60, f"the job took {seconds:.0f} s to die"


def _start(args: list[str], env: dict | None = None):
    """mpirun in the background, its stdout readable line by line."""
    argv, job_env = _job(4, args, env)
    return subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=job_env)


def _wait_for_line(proc, needle: str, timeout: float = 120) -> list[str]:
    lines, start = [], time.monotonic()
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output: {''.join(lines)}")


def _tiny_job(tmp_path, rounds: int) -> list[str]:
    from mpisage.data import write_fashion_mnist_fixture
    data = write_fashion_mnist_fixture(str(tmp_path / "data"), 900, 50)
    return [f"dataset.root={data}", "num_clients=3", f"rounds={rounds}", "batch_size=8", "fsl.align_steps=2",
            f"run_dir={tmp_path}/run", "checkpoint.interval=1", "runtime.comm_timeout_s=60"]


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_continues(tmp_path):
    import signal

    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    from mpisage.runtime.metrics import read_rounds
    # checkpoint.interval=0: no checkpoint but the one a stop signal asks for
    job = [a if a != "checkpoint.interval=1" else "checkpoint.interval=0" for a in _tiny_job(tmp_path, 10_000)]
    proc = _start(job)
    _wait_for_line(proc, "round    2/")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)            # what Slurm sends before a pre-emption or the time limit
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 60
    assert "SIGTERM: stopped after round" in out and "resume=auto" in out
    assert len(list_checkpoints(str(tmp_path / "run"))) == 1
    attrs, _ = read_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])
    stopped_at = int(attrs["round"])
    assert 1 <= stopped_at < 10_000
    rows = read_rounds(str(tmp_path / "run" / "metrics.h5"))     # what the checkpoint cost, per rank
    assert (rows["checkpoint_bytes_by_rank"][-1] > 0).all() and rows["checkpoint_seconds"][-1] > 0
    assert (rows["checkpoint_bytes_by_rank"][:-1] == 0).all() and (rows["checkpoint_seconds"][:-1] == 0).all()
    proc = _start(job[:2] + [f"rounds={stopped_at + 3}"] + job[3:] + ["resume=auto"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resuming after round {stopped_at + 1}" in out and f"round {stopped_at + 3:4d}/" in out


def test_nan_stops_the_run_naming_round_and_client(tmp_path):
    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    proc = _start(_tiny_job(tmp_path, 5), env={"MPISAGE_INJECT_NAN": "1:2"})   # client 1, round index 2
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "non-finite" in err and "client 1" in err and "round 2" in err
    read_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])   # the last good checkpoint still loads


def _rank_pid(tmp_path, rank: int) -> int:
    from mpisage.runtime.process import find_rank_process
    return find_rank_process(rank, str(tmp_path))      # the process of that rank in this test's job


def test_killed_client_rank_ends_the_job_and_last_checkpoint_loads(tmp_path):
    import signal

    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    proc = _start(_tiny_job(tmp_path, 10_000))
    _wait_for_line(proc, "round    2/")
    victim = _rank_pid(tmp_path, 3)
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60, "the job outlived a dead rank by more than a minute"
    attrs, _ = read_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])
    assert attrs["round"] >= 0


def test_gas_killed_mid_run_keeps_its_mid_run_checkpoint_and_resumes(tmp_path):
    """An asynchronous run checkpoints every checkpoint.interval updates while it goes on: kill -9 of a client rank
    after the first one ends the job (non-zero), the checkpoint is there and verifies, and the resumed run
    completes."""
    import signal

    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    gas = ["algorithm=gas", "model=alexnet", "asynchronous.active_clients=2", "asynchronous.local_iters=2",
           "optim.name=sgd", "optim.lr=0.01",
           "gas.covariance=diag", "eval.samples=20", "checkpoint.interval=2"]
    job = [a for a in _tiny_job(tmp_path, 10_000) if not a.startswith(("num_clients", "checkpoint.interval"))]
    job = ["num_clients=4", *job, *gas]
    proc = _start(job)
    _wait_for_line(proc, "checkpoint after update 2:")
    os.kill(_rank_pid(tmp_path, 3), signal.SIGKILL)
    start = time.monotonic()
    proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60, "the job outlived a dead rank by more than a minute"
    attrs, _ = read_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])
    stopped_at = int(attrs["round"])
    assert stopped_at >= 1 and (stopped_at + 1) % 2 == 0            # a mid-run checkpoint, not a stop's
    proc = _start([a if not a.startswith("rounds=") else f"rounds={stopped_at + 3}" for a in job] + ["resume=auto"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resuming after update {stopped_at + 1}" in out and f"update {stopped_at + 3:4d}/" in out


def test_frozen_rank_is_named_and_ends_the_job(tmp_path):
    """A rank that stops answering without dying (SIGSTOP here; a hung node in life) is caught by the heartbeat."""
    import signal
    proc = _start(_tiny_job(tmp_path, 10_000) + ["runtime.heartbeat_s=0.5", "runtime.heartbeat_timeout_s=4"])
    _wait_for_line(proc, "round    2/")
    os.kill(_rank_pid(tmp_path, 3), signal.SIGSTOP)
    start = time.monotonic()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "rank 3 (client) stopped answering" in err
    assert "rank 0 (fserver) Python stacks (it found rank 3 (client) silent)" in err   # the watcher's own stacks
    assert time.monotonic() - start < 30
