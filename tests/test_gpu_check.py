"""benchmarks/gpu_check.sh, the one prepared GPU check, in its CPU rehearsal: its fastest step writes the report,
and a spent time budget skips commands without stopping the script."""
import os
import subprocess
import sys
import tarfile

import torch
from conftest import ROOT

from mpisage.runtime.transport import query_mpi_cuda_support


def _check(tmp_path, steps: str, **env) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_STEPS": steps, "OUT": str(out),
                               "PY": sys.executable, "TMPDIR": str(tmp_path), **env})
    return proc, (out / "report.md").read_text()


def test_the_environment_step_reports_the_gpus_and_the_mpi_library(tmp_path):
    proc, report = _check(tmp_path, "env")
    assert proc.returncode == 0, proc.stderr
    assert report.startswith("# mpisage GPU check (DRY RUN")
    assert "## env" in report and "## install" not in report and "## tests" not in report
    assert f"CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}" in report
    library = query_mpi_cuda_support()
    assert f"MPIX_Query_cuda_support(): {'absent' if library is None else library} " in report
    assert f"torch {torch.__version__}" in report and "Total:" in report
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert "logs/env_probe.log" in tar.getnames()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("gpu-check.")]   # its scratch folder is removed


def test_a_spent_budget_skips_every_command_and_the_script_still_ends(tmp_path):
    proc, report = _check(tmp_path, "tests default", GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr
    for command in ("tests_gpu", "tests_mpi_devices", "default_cpu"):
        assert f"- `{command}`: SKIPPED (the check's time budget of 0 s is spent)" in report
    assert "Total:" in report
