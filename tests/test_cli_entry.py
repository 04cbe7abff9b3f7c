"""The CLI runs as `python -m conceptfix` and `python -m conceptfix.cli`, not only as the console script."""

import pkgutil
import subprocess
import sys

import pytest

import conceptfix.commands


@pytest.mark.parametrize("module", ["conceptfix", "conceptfix.cli"])
def test_python_dash_m_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"python -m {module}" in proc.stdout
    # Every stage module's command is registered (importing cli_app alone would list none of them).
    stages = [m.name for m in pkgutil.iter_modules(conceptfix.commands.__path__)]
    assert {"predict", "filter"} <= set(stages)
    for stage in stages:
        assert f" {stage} " in proc.stdout, stage


def test_python_dash_m_runs_a_command_and_reports_errors():
    proc = subprocess.run([sys.executable, "-m", "conceptfix", "filter", "--input", "/nonexistent.json",
                           "--output", "/tmp/never-written.json"],
                          capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "nonexistent.json" in proc.stderr
