"""Run zqcompile the way users do: the installed `zqcompile` command, or a fresh `python -c`, in a new process.

Both run against this checkout (PYTHONPATH puts it ahead of any installed copy), with no model hub and a
fixed thread count, and return the CompletedProcess so tests can assert on exit code, stdout and stderr.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra or {})
    return env


def zqcompile_cmd() -> str:
    """The console script `pip install -e .` put next to this interpreter (or on PATH)."""
    exe = Path(sys.executable).with_name("zqcompile")
    found = str(exe) if exe.exists() else shutil.which("zqcompile")
    assert found, "the `zqcompile` command is not installed: pip install -e '.[test]'"
    return found


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`zqcompile ARGS...` in a subprocess."""
    return subprocess.run([zqcompile_cmd(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def run_python(code: str, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS...` in a fresh interpreter (nothing imported but what CODE imports)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env(env))
