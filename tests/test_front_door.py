"""The first things a user touches: documented command lines are valid (`mpisage.run --print-config`), local links
in the docs resolve, the configuration reference matches the schema, set-up picks the right torch build, and a
Slurm job stopped by its time limit requeues itself until the run completes (stand-ins for srun and scontrol)."""
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT

from mpisage.config import Config, to_yaml

DOCS = [p for p in [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CONTRIBUTING.md"),
                    *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))] if os.path.exists(p)]
ENV = {**os.environ, "PYTHONPATH": ROOT}
# Words after which a command line's remaining arguments are mpisage.run's.
ENTRY = re.compile(r"^(mpisage\.run|slurm/(h100|cpu)\.sbatch)$")


def _code_lines(path: str) -> list[str]:
    """Lines of the fenced code blocks of a markdown file, continuation backslashes joined."""
    out, inside, pending = [], False, ""
    for line in open(path):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            pending += line.rstrip("\n")
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append(pending)
            pending = ""
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, mpisage.run arguments) of every command line in the docs' code blocks and the Slurm scripts' usage
    comments; usage lines with placeholders ([...], <...>, $VAR) are not commands and are left out."""
    found = []
    sources = [(p, _code_lines(p)) for p in DOCS]
    sources += [(p, [ln.lstrip("# ") for ln in open(p) if ln.startswith("#   ") and "sbatch" in ln])
                for p in sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sbatch")))]
    for path, lines in sources:
        for line in lines:
            for part in re.split(r"&&|;|\|", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                starts = [i for i, w in enumerate(words) if ENTRY.match(w)]
                if not starts:
                    continue
                args = words[starts[0] + 1:]
                if any(re.search(r"[\[\]<>$]|\.\.\.", a) for a in args):
                    continue
                found.append((f"{os.path.relpath(path, ROOT)}: {part.strip()}", args))
    return found


COMMANDS = documented_commands()


def test_docs_hold_commands():
    assert len(COMMANDS) >= 5, COMMANDS


@pytest.mark.parametrize("where,args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_valid(where, args):
    proc = subprocess.run([sys.executable, "-m", "mpisage.run", "--print-config", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{where}\n{proc.stderr}"
    assert "algorithm:" in proc.stdout


def test_print_config_needs_no_mpi_and_reports_bad_values():
    code = ("import sys, runpy; sys.modules['mpi4py'] = None; sys.argv = ['mpisage.run', '--print-config', "
            "'rounds=3', 'dataset.alpha=0.5']; runpy.run_module('mpisage.run', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = Config()
    cfg.rounds, cfg.dataset.alpha = 3, 0.5
    assert proc.stdout == to_yaml(cfg)
    bad = subprocess.run([sys.executable, "-m", "mpisage.run", "--print-config", "dataset.alpha=-1"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("[mpisage] config error:") and "dataset.alpha" in bad.stderr
    assert bad.stdout == ""


def test_local_links_resolve():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            local = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
            if not os.path.exists(local):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, broken


def test_config_reference_is_current():
    proc = subprocess.run([sys.executable, "-m", "mpisage.tools.config_reference", "--check"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from mpisage.tools.config_reference import render
    text = render()
    for key in ("`rounds`", "`dataset.alpha`", "`client_store.slots`", "`wire.activations`"):
        assert key in text
    assert "stop after the round in which the paper-figure load reaches this (MiB)" in text   # a field's comment


# --- set-up: which torch build ---------------------------------------------------------------------------------

def _stub(folder, name: str, body: str) -> None:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body + "\n")
    os.chmod(path, 0o755)


def _plan(tmp_path, gpu: bool | None, **env) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu is not None:
        _stub(bin_dir, "nvidia-smi", "exit 0" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    run_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL")}
    run_env.update({"PATH": f"{bin_dir}:/usr/bin:/bin", "NVIDIA_PROC": str(tmp_path / "no-driver"), **env})
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "torch_build.sh"), "plan"], env=run_env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split()


def test_torch_build_choice(tmp_path):
    assert _plan(tmp_path, None) == ["cpu", "torch==2.13.0", "https://download.pytorch.org/whl/cpu"]
    assert _plan(tmp_path, False) == ["cpu", "torch==2.13.0", "https://download.pytorch.org/whl/cpu"]
    assert _plan(tmp_path, True) == ["cuda", "torch==2.13.0", "-"]
    (tmp_path / "driver").mkdir()
    assert _plan(tmp_path, None, NVIDIA_PROC=str(tmp_path / "driver"))[0] == "cuda"
    assert _plan(tmp_path, True, TORCH_INDEX_URL="https://example.org/whl") == \
        ["given", "torch==2.13.0", "https://example.org/whl"]
    assert _plan(tmp_path, False, TORCH_SPEC="torch==2.12.1")[:2] == ["cpu", "torch==2.12.1"]


def test_torch_build_of_this_venv():
    kind = subprocess.run(["bash", os.path.join(ROOT, "scripts", "torch_build.sh"), "kind", sys.executable],
                          capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    import torch
    assert kind == ("cuda" if torch.version.cuda else "cpu")


# --- Slurm: the time limit's USR1 requeues an unfinished run ---------------------------------------------------

def _fake_metrics(run_dir, rounds_done: int, rounds: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "w") as f:
        f.attrs["config"] = f"rounds: {rounds}\ncomm_threshold_mb: 204800.0\n"
        f.create_dataset("rounds/test_acc", data=np.full(rounds_done, 0.5))
        f.create_dataset("rounds/comm_bytes", data=np.arange(1, rounds_done + 1) * 1000)


def _batch_job(tmp_path, signal_it: bool, rounds_done: int = 2, srun_exit: int = 0, **env):
    """Runs slurm/cpu.sbatch with stand-in srun/scontrol; returns (exit code, srun's arguments, scontrol's)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    run_dir = tmp_path / "run"
    _fake_metrics(run_dir, rounds_done, 4)      # what the run has written by the time the signal comes
    # srun: tells the test it is up, and on USR1 stops (as mpisage does: checkpoint, exit 0).
    _stub(bin_dir, "srun", f'echo "srun $*" >> {log}\n'
          f'trap \'echo "srun got USR1" >> {log}; exit {srun_exit}\' USR1\n'
          f'touch {tmp_path}/started\nfor i in $(seq 600); do sleep 0.1; done; exit 0')
    _stub(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}')
    job_env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": ROOT, "SLURM_JOB_ID": "77",
               "SLURM_JOB_NAME": "mpisage", "SLURM_NTASKS": "11", "SLURM_CPUS_PER_TASK": "2",
               "RUN_DIR": str(run_dir), "VENV": os.path.dirname(os.path.dirname(sys.executable)), **env}
    job = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "cpu.sbatch"), "rounds=4"], env=job_env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0]
        time.sleep(0.1)
    if signal_it:
        job.send_signal(signal.SIGUSR1)
    else:
        _fake_metrics(run_dir, 4, 4)
        subprocess.run(["pkill", "-USR1", "-P", str(job.pid), "-x", "srun"], check=False)   # the stand-in ends
    out, _ = job.communicate(timeout=120)
    lines = open(log).read().splitlines()
    return job.returncode, out, [ln for ln in lines if ln.startswith("srun ")], \
        [ln for ln in lines if ln.startswith("scontrol")]


def test_time_limit_requeues_an_unfinished_run(tmp_path):
    rc, out, srun, scontrol = _batch_job(tmp_path, signal_it=True)
    assert rc == 0, out
    assert "srun got USR1" in open(tmp_path / "log").read()       # forwarded to the run
    assert scontrol == ["scontrol requeue 77"], out
    assert f"run_dir={tmp_path / 'run'}" in srun[0] and "resume=auto" in srun[0] and "runtime.torch_threads=2" in srun[0]
    assert srun[0].rstrip().endswith("rounds=4")
    # the keys the batch scripts add themselves are valid ones (key renames must reach slurm/launch.sh too)
    args = shlex.split(srun[0])
    proc = subprocess.run([sys.executable, "-m", "mpisage.run", "--print-config",
                           *args[args.index("mpisage.run") + 1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_time_limit_on_a_finished_run_does_not_requeue(tmp_path):
    rc, out, _, scontrol = _batch_job(tmp_path, signal_it=True, rounds_done=4)
    assert rc == 0 and scontrol == [] and "not requeued" in out, out


def test_a_failed_run_is_not_requeued(tmp_path):
    rc, out, _, scontrol = _batch_job(tmp_path, signal_it=True, srun_exit=1)
    assert rc == 1 and scontrol == [] and "failed (exit code 1" in out, out


def test_requeue_opt_out(tmp_path):
    rc, out, _, scontrol = _batch_job(tmp_path, signal_it=True, MPISAGE_REQUEUE="0")
    assert rc == 0 and scontrol == [] and "MPISAGE_REQUEUE=0" in out, out


def test_run_ending_on_its_own_does_not_requeue(tmp_path):
    rc, out, _, scontrol = _batch_job(tmp_path, signal_it=False)
    assert rc == 0 and scontrol == [], out


def test_compare_sbatch_requeues_a_comparison_stopped_part_way(tmp_path):
    """compare.sbatch hands USR1 to the compare tool and requeues when the tool says it stopped part-way (exit 3)."""
    venv, log = tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    # python stand-in: the compare tool, which on USR1 stops its run and exits 3 (mpisage.tools.compare.STOPPED)
    _stub(venv / "bin", "python", f'echo "compare $*" >> {log}\ntrap \'echo "compare got USR1" >> {log}; exit 3\' USR1\n'
          f'touch {tmp_path}/started\nfor i in $(seq 600); do sleep 0.1; done; exit 0')
    _stub(tmp_path, "scontrol", f'echo "scontrol $*" >> {log}')
    job_env = {**ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": ROOT, "SLURM_JOB_ID": "78",
               "SLURM_NTASKS": "12", "SLURM_CPUS_PER_TASK": "2", "VENV": str(venv)}
    job = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "compare.sbatch"), "--seeds", "3", "--methods",
                            "fsl_sage,fed_avg", "rounds=8"], env=job_env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0]
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=120)
    lines = open(log).read().splitlines()
    assert job.returncode == 0, out
    assert "compare got USR1" in lines and "scontrol requeue 78" in lines, (lines, out)
    assert lines[0].startswith("compare -m mpisage.tools.compare --seeds 3 --methods fsl_sage,fed_avg rounds=8 --ranks 12")
    overrides = [w for w in lines[0].split()[3:] if "=" in w and not w.startswith("-")]   # the script's own keys too
    proc = subprocess.run([sys.executable, "-m", "mpisage.run", "--print-config", *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(overrides) == 2, (overrides, proc.stderr)


def test_compare_tool_forwards_a_stop_signal_and_starts_no_further_run(monkeypatch, tmp_path):
    import threading

    from mpisage.tools import compare
    marker = tmp_path / "child-got-usr1"
    child = ["bash", "-c", f"trap 'touch {marker}; exit 0' USR1; for i in $(seq 600); do sleep 0.1; done; exit 9"]
    monkeypatch.setattr(compare, "job_command", lambda ranks, overrides: (child, dict(os.environ)))
    before = signal.getsignal(signal.SIGUSR1)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    with pytest.raises(SystemExit) as stopped:
        compare.run_method("fsl_sage", 3, [], str(tmp_path / "run"))
    assert stopped.value.code == compare.STOPPED and marker.exists()
    assert signal.getsignal(signal.SIGUSR1) == before      # the tool's forwarding handler is gone again
