"""A queued kernel as JupyterLab shows it: a real JupyterLab 4 in Debian's
headless Chromium (tests/browser/queued.mjs), a notebook on the noyau Slurm
kernelspec, the test node held by a blocker job. The status bar must read
Idle once the kernel answered (not Unknown for the whole wait), then Busy
right after Shift+Enter while the job is still pending (issue 20).
Screenshots in target/test-logs/queued-lab/."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import browser_testlib as bt
import noyau_testlib as lib
from test_labext_browser import Lab, write_notebook

SHOTS = bt.ROOT / "target" / "test-logs" / "queued-lab"


def run_browser(lab: Lab, tmp_path: Path) -> dict[str, dict]:
    env = dict(os.environ, LAB_URL=f"{lab.url}/lab", NOTEBOOK="queued.ipynb", SHOTS_DIR=str(SHOTS),
               PROFILE_DIR=str(tmp_path / "chromium-profile"))
    r = subprocess.run(["node", str(bt.BROWSER / "queued.mjs")], capture_output=True, text=True, env=env,
                       cwd=bt.BROWSER, timeout=300)
    steps = {s.get("step", "error"): s for s in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 0, f"browser: {steps} {r.stderr[-2000:]} (screenshots in {SHOTS}; Lab log {lab.log})"
    return steps


def test_lab_reads_a_queued_kernel_as_idle_then_busy(slurm: None, tmp_path: Path) -> None:
    bt.require_browser()
    cluster = lib.CLUSTERS["slurm"]
    work = tmp_path / "lab" / "work"
    work.mkdir(parents=True)
    write_notebook(work / "queued.ipynb", lib.SLURM_KERNEL_NAME, "Python 3 (noyau slurm)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    blocker = cluster.fill_the_node()
    lab = Lab(tmp_path / "lab", tmp_path / "no-extra-kernels")
    try:
        steps = run_browser(lab, tmp_path)
        kernel_jobs = [j for j in cluster.jobs() if j["name"] == "noyau-kernel-python3"]
        # Busy came from the queued kernel itself: its job never left the queue.
        assert [j["state"] for j in kernel_jobs] == [cluster.pending], kernel_jobs
        assert "idle" in steps and "busy" in steps, steps
        print(f"status bar read Busy {steps['busy']['after_ms']} ms after Shift+Enter")
    finally:
        cluster.cancel(blocker)
        lab.close()
    lib.wait_until(lambda: not cluster.jobs(), 60, "the kernel's job to end with JupyterLab", interval=0.5)
