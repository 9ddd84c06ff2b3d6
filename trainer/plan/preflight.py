"""`cairl train`'s pre-flight: plan the run for this host's devices before Ray starts, refuse what will not fit.

    preflight(config)   # raises PreflightError (exit 2) with the plan's paragraph of numbers and advice

The plan runs in a child process (`cairl plan --target local`): the driver itself never opens a JAX
backend, so an accelerator stays free for the learner, and the child's compiles land in the
persistent compilation cache the learner reads (`trainer.runtime.configure_jax`). plan.json is
written to the run directory.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.errors import UserError

log = logging.getLogger(__name__)


class PreflightError(UserError, RuntimeError):
    """The run does not fit this host's devices (or could not be planned)."""


def preflight(config) -> Path:
    """Plan `config` on this host's devices; returns the plan.json path, raises when the run does not fit."""
    from trainer.config import to_yaml

    out_dir = config.run_dir
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cairl-preflight-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(to_yaml(config), encoding="utf-8")
        command = [sys.executable, "-m", "trainer.cli", "plan", "--config", str(resolved), "--target", "local",
                   "--out", str(out_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
    log.info("preflight plan (%.1f s):\n%s", time.perf_counter() - start, result.stdout.strip())
    if result.returncode == 2:  # the refusal paragraph (last stdout line) or a UserError (last stderr line)
        stdout, stderr = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
        reason = stdout[-1] if stdout and stdout[-1].startswith("This run does not fit") else stderr[-1]
        raise PreflightError(f"preflight: {reason} (plan: {out_dir / 'plan.json'}; run.preflight=false skips this check)")
    if result.returncode:
        raise PreflightError(f"preflight: cairl plan failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    return out_dir / "plan.json"
