"""OpenMP's wait policy: moe-local chooses it before torch loads libgomp (which reads it once), unless the user
did. Its speed is a measurement (scripts/threads_under_load.py, docs/measurements.md), not a test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

THROUGH_THE_CLI = """
import os, sys
from moe_local import cli
sys.argv = ["moe-local", "--version"]
try:
    cli.main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""

THROUGH_THE_LIBRARY = """
import os, sys
import moe_local
moe_local.load  # what `moe_local.load(...)` does first
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""


def environment_seen(script: str, **given: str) -> list[str]:
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", script], env={**env, **given}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1].split()  # the last line: after what the command printed


@pytest.mark.parametrize("script", [THROUGH_THE_CLI, THROUGH_THE_LIBRARY], ids=["cli", "library"])
def test_threads_spin_briefly_before_they_sleep_unless_the_user_chose(script):
    assert environment_seen(script)[:2] == ["None", "300"]
    assert environment_seen(script, OMP_WAIT_POLICY="active")[:2] == ["active", "None"]
    assert environment_seen(script, GOMP_SPINCOUNT="10000")[:2] == ["None", "10000"]


def test_the_library_sets_the_policy_before_torch_is_imported_and_not_after():
    assert environment_seen(THROUGH_THE_LIBRARY) == ["None", "300", "True"]  # set, then the engine imported torch
    late = "import torch\n" + THROUGH_THE_LIBRARY  # libgomp has read its environment already: nothing to set
    assert environment_seen(late)[:2] == ["None", "None"]
