"""The README's main command, small: ``deploy/demo.py`` starts its own servers, migrates,
runs two workers and drives flow runs with tasks to their end, and reports it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.unit.deploy.paths import ROOT

pytestmark = pytest.mark.system


@pytest.mark.timeout(300)
def test_the_demo_drives_every_flow_run_to_its_end_and_both_workers_exit_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy/demo.py"), "--flows", "6", "--tasks-per-flow", "2"],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=ROOT.parent,  # not the checkout: the script finds its own modules
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert re.search(r"^flow runs\s+6$", printed, re.MULTILINE), printed
    assert re.search(r"^task runs\s+12$", printed, re.MULTILINE), printed
    assert re.search(r"^worker exit codes\s+0 0$", printed, re.MULTILINE), printed
    flows = printed.split("Final flow-run states")[1].split("Final task-run states")[0]
    assert re.search(r"^Completed\s+6$", flows, re.MULTILINE), flows
    assert "Rule decisions" in printed
