"""Kernels in Slurm batch jobs, on the real test cluster of scripts/slurm-up.

The kernelspec `noyau-slurm-python3` (installed by conftest when the cluster is
up) runs python3 through `noyau kernel --backend slurm --profile test`, the
profile living in the session's user config file (partition `debug`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import noyau_testlib as lib
from noyau_testlib import Kernel




def no_noyau_job(timeout: float, what: str) -> None:
    lib.wait_until(lambda: not lib.squeue_noyau(), timeout, what, interval=0.5)


def test_cells_run_in_a_job_and_shutdown_ends_it(slurm: None) -> None:
    k = Kernel(lib.SLURM_KERNEL_NAME)
    try:
        reply, iopub = k.run("import os; print(os.environ.get('SLURM_JOB_ID'))", timeout=120)
        assert reply["content"]["status"] == "ok"
        job_id = lib.stream_text(iopub).strip()
        jobs = lib.squeue_noyau()
        assert [j["id"] for j in jobs] == [job_id], jobs
        assert jobs[0]["name"] == "noyau-kernel-python3" and jobs[0]["state"] == "RUNNING"
        # the kernel does not see the link's secrets
        _, iopub = k.run("print(sorted(k for k in os.environ if k.startswith('NOYAU_LINK')))")
        assert lib.stream_text(iopub).strip() == "[]"
    finally:
        k.shutdown()
    no_noyau_job(20, "the kernel's job to leave the queue after shutdown")


def test_queued_kernel_shows_the_reason_then_runs(slurm: None) -> None:
    blocker = lib.fill_the_node()
    k = None
    try:
        t0 = time.monotonic()
        k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=30)
        assert time.monotonic() - t0 < 15, "kernel_info was not answered while queued"
        info = k.kc.kernel_info(reply=True, timeout=10)
        assert info["content"]["language_info"]["name"] == "python"
        msg_id = k.execute("print('ran after the queue')")
        # the note says why the job waits
        # the note says why the job waits (first "submitted", then Slurm's reason)
        notes = k.iopub_for(msg_id, lambda m: m["msg_type"] in ("display_data", "update_display_data")
                            and ("reason Resources" in lib.message_text(m)
                                 or "reason Priority" in lib.message_text(m)), 30)
        assert notes[0]["msg_type"] == "display_data", [m["msg_type"] for m in notes]
        text = lib.message_text(notes[-1])
        assert "queued on slurm job" in text, text
        assert "(partition debug)" in text, text
        kernel_job = [j for j in lib.squeue_noyau() if j["name"] == "noyau-kernel-python3"]
        assert len(kernel_job) == 1 and kernel_job[0]["state"] == "PENDING", kernel_job
        assert f"job {kernel_job[0]['id']}" in text
        subprocess.run(["scancel", blocker], check=True)
        rest = k.iopub_for(msg_id, lib.is_idle, 90)
        types = [m["msg_type"] for m in rest]
        assert "clear_output" in types, types
        assert types.index("clear_output") < types.index("stream"), types
        assert lib.stream_text(rest) == "ran after the queue\n"
        reply = k.reply_for(msg_id, 10)
        assert reply["content"]["status"] == "ok"
    finally:
        subprocess.run(["scancel", blocker], check=False)
        if k:
            k.shutdown()
    no_noyau_job(20, "no noyau job after shutdown")


def test_shutdown_while_queued_cancels_the_job(slurm: None) -> None:
    blocker = lib.fill_the_node()
    try:
        k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=30)
        lib.wait_until(lambda: any(j["name"] == "noyau-kernel-python3" and j["state"] == "PENDING"
                                   for j in lib.squeue_noyau()), 20, "the kernel's job to queue")
        k.shutdown()
        lib.wait_until(lambda: not any(j["name"] == "noyau-kernel-python3"
                                       for j in lib.squeue_noyau()), 20,
                       "the queued job to be cancelled by the shutdown")
    finally:
        subprocess.run(["scancel", blocker], check=False)
    no_noyau_job(20, "no noyau job left")


def test_kill_9_of_the_proxy_ends_the_job_after_the_grace(slurm: None) -> None:
    k = Kernel(lib.SLURM_KERNEL_NAME,
               env={"NOYAU_LINK_GIVE_UP": "5", "NOYAU_REATTACH_GRACE": "5"})
    try:
        reply, _ = k.run("x = 1", timeout=120)
        assert reply["content"]["status"] == "ok"
        assert lib.squeue_noyau()
        lib.kill(k.launched_pid, signal.SIGKILL)
        no_noyau_job(40, "the job to end once its agent gave up on the dead proxy")
    finally:
        k.kc.stop_channels()
        try:
            k.km.shutdown_kernel(now=True)
        except Exception:
            pass


def test_controller_down_for_30_s_does_not_kill_the_kernel(slurm: None) -> None:
    sdir = Path(os.environ["NOYAU_SLURM_DIR"])
    conf = os.environ["SLURM_CONF"]
    k = Kernel(lib.SLURM_KERNEL_NAME)
    try:
        reply, _ = k.run("n = 41", timeout=120)
        assert reply["content"]["status"] == "ok"
        pid = int((sdir / "slurmctld.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        lib.wait_until(lambda: not lib.alive(pid), 20, "slurmctld to stop")
        try:
            down = time.monotonic()
            # cells keep running while the controller is away
            reply, iopub = k.run("n += 1; print(n)", timeout=30)
            assert lib.stream_text(iopub) == "42\n"
            time.sleep(max(0.0, 30 - (time.monotonic() - down)))
        finally:
            # restart it without -c: it keeps its jobs
            # (and without this session's marker: conftest kills marked leftovers)
            env = {k: v for k, v in os.environ.items() if k not in (lib.SESSION_VAR, lib.TAG_VAR)}
            subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
        lib.wait_until(lambda: subprocess.run(["squeue", "-h"], capture_output=True).returncode == 0,
                       60, "slurmctld to answer again", interval=0.5)
        reply, iopub = k.run("n += 1; print(n)", timeout=60)
        assert reply["content"]["status"] == "ok" and lib.stream_text(iopub) == "43\n"
        assert [j["state"] for j in lib.squeue_noyau()] == ["RUNNING"]
    finally:
        k.shutdown()
    no_noyau_job(30, "no noyau job after shutdown")


def test_restart_keeps_the_job_and_its_death_is_still_seen(slurm: None) -> None:
    """A restart hands the agent (and its allocation) to the next proxy,
    which follows the same Slurm job: cancelling it afterwards is reported."""
    k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=120)
    try:
        _, iopub = k.run("import os; print(os.environ['SLURM_JOB_ID'])")
        job = lib.stream_text(iopub).strip()
        assert job.isdigit()
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=120)
        _, iopub = k.run("import os; print(os.environ['SLURM_JOB_ID'])")
        assert lib.stream_text(iopub).strip() == job, "the restart lost the allocation"
        msg_id = k.execute("import time; time.sleep(120)")
        subprocess.run(["scancel", job], check=True)
        reply = k.reply_for(msg_id, 30)
        assert reply["content"]["status"] == "error" and "died" in reply["content"]["evalue"], reply["content"]
    finally:
        k.shutdown()
    no_noyau_job(30, "no noyau job after the cancelled kernel")
