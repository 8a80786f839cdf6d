"""Every benchmark script starts when run as a file from anywhere, as the README runs them
(their imports reach devtools/ and the project without an installed checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    path
    for path in [*ROOT.glob("benchmarks/*.py"), ROOT / "deploy/demo.py"]
    if "argparse" in path.read_text(encoding="utf-8")
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_the_script_answers_help_when_run_as_a_file(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
