"""Kill a training process in the middle of writing a checkpoint (shared by the checkpoint tests)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from looptrain.checkpoint.layout import committed


def kill_while_saving(proc: subprocess.Popen, root: Path, timeout_s: float) -> None:
    """SIGKILL `proc` once one checkpoint under `root` is committed and the next one is being written.

    Fails the test if the process ends first or no save is in flight within `timeout_s`
    (a hang limit only: the run is killed long before its last step).
    """
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert proc.poll() is None, "the training ended before a save could be interrupted"
            if committed(root) and any(p.name.startswith(".tmp-") and (p / "model").exists()
                                       for p in root.iterdir()):
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"no checkpoint was being written within {timeout_s:.0f} s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
