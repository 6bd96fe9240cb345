"""What the cluster does to a kernel's job, on the real test cluster of
scripts/slurm-up: its node fails, Slurm is asked to requeue it, a job of a
higher-priority partition preempts it, sbatch refuses it. Each time the user
is told what happened, in the cell that was running or on the command line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import noyau_testlib as lib
from noyau_testlib import Kernel


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


def node() -> str:
    return sh("sinfo", "-h", "-N", "-o", "%N").stdout.split()[0]


def kernel_job(k: Kernel) -> str:
    reply, iopub = k.run("import os; print(os.environ['SLURM_JOB_ID'])", timeout=120)
    assert reply["content"]["status"] == "ok"
    return lib.stream_text(iopub).strip()


def sleeping_cell(k: Kernel) -> str:
    msg_id = k.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(600)")
    k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "sleeping" in m["content"]["text"], 60)
    return msg_id


def failure_text(k: Kernel, msg_id: str) -> str:
    """The running cell's error reply and what IOPub said with it."""
    reply = k.reply_for(msg_id, timeout=90)
    assert reply["content"]["status"] == "error", reply["content"]
    msgs = k.iopub_for(msg_id, lib.is_idle, 30)
    return " ".join([reply["content"].get("evalue", ""), *map(lib.message_text, msgs)])


def no_noyau_job(timeout: float, what: str) -> None:
    lib.wait_until(lambda: not lib.squeue_noyau(), timeout, what, interval=0.5)


def test_node_failure_ends_the_kernel_and_says_so(slurm: None) -> None:
    k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=120)
    n = node()
    try:
        kernel_job(k)
        msg_id = sleeping_cell(k)
        sh("scontrol", "update", f"nodename={n}", "state=down", "reason=noyau-test-node-failure")
        text = failure_text(k, msg_id)
        # Whichever tells the proxy first, the kernel's death from the agent
        # ("The kernel died: it was stopped: its job lost its node …") or the
        # agent's end from the job's watch ("The noyau agent running the
        # kernel died: it lost its node …"), the user reads why.
        assert "lost its node (Slurm state NODE_FAIL)" in text, text
    finally:
        sh("scontrol", "update", f"nodename={n}", "state=resume", check=False)
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)
    lib.wait_until(lambda: sh("sinfo", "-h", "-o", "%T").stdout.strip() in ("idle", "mixed"), 60,
                   "the node back in service", interval=0.5)
    no_noyau_job(60, "the failed kernel's job to leave the queue")


def test_requeue_is_refused_and_the_kernel_goes_on(slurm: None) -> None:
    """A kernel's job cannot be requeued (it could not resume): Slurm refuses,
    and the kernel keeps its state."""
    k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=120)
    try:
        job = kernel_job(k)
        k.run("kept = 41")
        r = sh("scontrol", "requeue", job, check=False)
        assert r.returncode != 0, r
        reply, iopub = k.run("kept += 1; print(kept)")
        assert lib.stream_text(iopub) == "42\n"
        assert [(j["id"], j["state"]) for j in lib.squeue_noyau()] == [(job, "RUNNING")]
    finally:
        k.shutdown()
    no_noyau_job(30, "no noyau job after shutdown")


def test_preemption_ends_the_kernel_and_says_so(slurm: None) -> None:
    k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=120)
    urgent = None
    try:
        job = kernel_job(k)
        msg_id = sleeping_cell(k)
        urgent = sh("sbatch", "--parsable", "-p", "urgent", "-J", "noyau-test-urgent",
                    "-c", str(lib.slurm_node_cpus()), "--mem", "100M", "-t", "5", "-o", "/dev/null",
                    "--wrap", "sleep 300").stdout.strip()
        text = failure_text(k, msg_id)
        assert "its job was preempted" in text, text
        lib.wait_until(lambda: job not in [j["id"] for j in lib.squeue_noyau() if j["state"] != "PREEMPTED"],
                       60, "the preempted job gone")
    finally:
        if urgent:
            sh("scancel", urgent, check=False)
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)
    no_noyau_job(60, "no noyau job left")


def test_sbatch_refusing_the_job_is_a_clear_error(slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    nb = tmp_path / "in.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "source": "1", "outputs": [],
                                         "execution_count": None, "id": "a"}],
                              "nbformat": 4, "nbformat_minor": 5,
                              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                          "language": "python"}}}))
    r = subprocess.run([noyau_bin, "run", "--no-progress", "--backend", "slurm", "--profile", "test",
                        "-o", "mem=64T", str(nb), str(tmp_path / "out.ipynb")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 5, r
    assert "sbatch" in r.stderr and "Memory specification" in r.stderr, r.stderr
    assert "panicked" not in r.stderr
    assert not lib.squeue_noyau()
