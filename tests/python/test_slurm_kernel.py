"""Kernels in batch jobs, on the real test clusters of scripts/slurm-up and
scripts/oar-up: the tests taking the `batch` fixture run on each scheduler.

The kernelspec `noyau-slurm-python3` (installed by conftest when the cluster is
up) runs python3 through `noyau kernel --backend slurm --profile test`, the
profile living in the session's user config file (partition `debug`);
`noyau-oar-python3` runs `noyau kernel --backend oar` as OAR's test user
(tests/python/oar_user_kernel.py).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import noyau_testlib as lib
from noyau_testlib import Kernel




def no_noyau_job(timeout: float, what: str, batch: lib.Cluster = lib.CLUSTERS["slurm"]) -> None:
    lib.wait_until(lambda: not batch.jobs(), timeout, what, interval=0.5)


def test_cells_run_in_a_job_and_shutdown_ends_it(batch: lib.Cluster) -> None:
    k = Kernel(batch.kernel_name)
    try:
        reply, iopub = k.run(f"import os; print(os.environ.get({batch.job_var!r}))", timeout=120)
        assert reply["content"]["status"] == "ok"
        job_id = lib.stream_text(iopub).strip()
        jobs = batch.jobs()
        assert [j["id"] for j in jobs] == [job_id], jobs
        assert jobs[0]["name"] == "noyau-kernel-python3" and jobs[0]["state"] == batch.running
        # the kernel does not see the link's secrets
        _, iopub = k.run("print(sorted(k for k in os.environ if k.startswith('NOYAU_LINK')))")
        assert lib.stream_text(iopub).strip() == "[]"
    finally:
        k.shutdown()
    no_noyau_job(30, "the kernel's job to leave the queue after shutdown", batch)


def test_queued_kernel_shows_the_reason_then_runs(batch: lib.Cluster) -> None:
    blocker = batch.fill_the_node()
    k = None
    try:
        t0 = time.monotonic()
        k = Kernel(batch.kernel_name, ready_timeout=30)
        assert time.monotonic() - t0 < 15, "kernel_info was not answered while queued"
        info = k.kc.kernel_info(reply=True, timeout=10)
        assert info["content"]["language_info"]["name"] == "python"
        msg_id = k.execute("print('ran after the queue')")
        # the note says why the job waits (first "submitted", then the scheduler's reason)
        notes = k.iopub_for(msg_id, lambda m: m["msg_type"] in ("display_data", "update_display_data")
                            and any(r in lib.message_text(m) for r in batch.wait_reasons), 30)
        # busy at once (the cell waits as for a busy kernel), then the note
        assert notes[0]["msg_type"] == "status" and notes[0]["content"]["execution_state"] == "busy", notes[0]
        notes = [m for m in notes if m["msg_type"] != "status"]
        assert notes[0]["msg_type"] == "display_data", [m["msg_type"] for m in notes]
        text = lib.message_text(notes[-1])
        assert f"queued on {batch.name} job" in text, text
        assert batch.queue_note in text, text
        kernel_job = [j for j in batch.jobs() if j["name"] == "noyau-kernel-python3"]
        assert len(kernel_job) == 1 and kernel_job[0]["state"] == batch.pending, kernel_job
        assert f"job {kernel_job[0]['id']}" in text
        batch.cancel(blocker)
        rest = k.iopub_for(msg_id, lib.is_idle, 90)
        types = [m["msg_type"] for m in rest]
        assert "clear_output" in types, types
        assert types.index("clear_output") < types.index("stream"), types
        assert lib.stream_text(rest) == "ran after the queue\n"
        reply = k.reply_for(msg_id, 10)
        assert reply["content"]["status"] == "ok"
    finally:
        batch.cancel(blocker)
        if k:
            k.shutdown()
    no_noyau_job(30, "no noyau job after shutdown", batch)


def test_shutdown_while_queued_cancels_the_job(batch: lib.Cluster, tmp_path: Path) -> None:
    """A shutdown (which jupyter_client precedes with an interrupt) cancels
    the queued job quietly: said at info level, no error."""
    blocker = batch.fill_the_node()
    log = tmp_path / "proxy.log"
    try:
        with log.open("w") as err:
            k = Kernel(batch.kernel_name, ready_timeout=30, stderr=err)
        lib.wait_until(lambda: any(j["name"] == "noyau-kernel-python3" and j["state"] == batch.pending
                                   for j in batch.jobs()), 20, "the kernel's job to queue")
        k.shutdown()
        lib.wait_until(lambda: not any(j["name"] == "noyau-kernel-python3"
                                       for j in batch.jobs()), 20,
                       "the queued job to be cancelled by the shutdown")
    finally:
        batch.cancel(blocker)
    text = log.read_text()
    assert "shut down while its" in text and "the job is cancelled" in text, text
    assert "ERROR" not in text and "cancelled while queued (interrupt)" not in text, text
    no_noyau_job(30, "no noyau job left", batch)


def test_interrupt_while_queued_cancels_the_job_and_says_so(slurm: None) -> None:
    """An interrupt alone (no shutdown after it) still cancels the queued job,
    fails the waiting cell with the reason, and ends the kernel."""
    cluster = lib.CLUSTERS["slurm"]
    blocker = cluster.fill_the_node()
    k = None
    try:
        k = Kernel(cluster.kernel_name, ready_timeout=30)
        msg_id = k.execute("print('never')")
        lib.wait_until(lambda: any(j["name"] == "noyau-kernel-python3" and j["state"] == cluster.pending
                                   for j in cluster.jobs()), 20, "the kernel's job to queue")
        k.km.interrupt_kernel()
        reply = k.reply_for(msg_id, 20)
        assert reply["content"]["status"] == "error", reply["content"]
        assert "cancelled while queued (interrupt)" in reply["content"]["evalue"], reply["content"]
        lib.wait_until(lambda: not any(j["name"] == "noyau-kernel-python3" for j in cluster.jobs()), 20,
                       "the queued job to be cancelled by the interrupt")
        lib.wait_until(lambda: not k.km.is_alive(), 20, "the kernel to end")
    finally:
        cluster.cancel(blocker)
        if k:
            k.shutdown()
    no_noyau_job(30, "no noyau job left")


def test_sigterm_while_sbatch_runs_cancels_the_job_it_gives(slurm: None, tmp_path: Path) -> None:
    """Jupyter's SIGTERM (its shutdown of a kernel that cannot answer yet)
    while the kernel's sbatch runs: the proxy waits for sbatch's answer,
    cancels the job it names at once, says so, and ends; no job is left.
    sbatch is held by a wrapper on PATH until the test, having seen the
    proxy take the signal, opens a FIFO: the job id comes after the cancel."""
    import os
    from jupyter_client.manager import KernelManager

    cluster = lib.CLUSTERS["slurm"]
    bindir, gate, began = lib.held_sbatch(tmp_path)
    log = tmp_path / "proxy.log"
    km = KernelManager(kernel_name=cluster.kernel_name)
    with log.open("w") as err:
        km.start_kernel(env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, stderr=err)
    try:
        lib.wait_until(began.exists, 60, "the kernel's sbatch to start")
        proxy = km.provisioner.process  # type: ignore[union-attr]
        proxy.send_signal(signal.SIGTERM)
        lib.wait_until(lambda: "terminated while" in log.read_text() or proxy.poll() is not None, 30,
                       "the proxy to take the SIGTERM")
        with gate.open("w"):
            pass  # sbatch goes on, and submits
        lib.wait_until(lambda: proxy.poll() is not None, 60, "the proxy to end")
        text = log.read_text()
        said = re.search(r"Slurm job (\d+) was submitted after its caller gave up", text)
        assert said, text
        lib.wait_until(lambda: not any(j["name"] == "noyau-kernel-python3" for j in cluster.jobs()), 30,
                       f"job {said.group(1)}, given after the SIGTERM, to be cancelled")
        assert proxy.returncode == 143, (proxy.returncode, text)
    finally:
        try:  # a held sbatch is let go (it reads the FIFO), else nothing
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    no_noyau_job(30, "no noyau job left")


def _statuses(msgs: list[dict]) -> list[tuple[str, str | None]]:
    return [(m["content"]["execution_state"], m["parent_header"].get("msg_id"))
            for m in msgs if m["msg_type"] == "status"]


def _iopub_until(kc, until, timeout: float) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every IOPub message (any parent) until `until(msgs)` holds."""
    import queue

    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; IOPub so far: {[(m['msg_type'], m['content']) for m in got][-12:]}"
        try:
            got.append(kc.get_iopub_msg(timeout=min(left, 0.5)))
        except queue.Empty:
            pass
    return got


def test_queued_kernel_looks_up_and_busy(slurm: None) -> None:
    """While its job waits, a kernel looks to a frontend like one that is up
    (idle once kernel_info is answered, with an empty-parent status too, as
    JupyterLab ignores kernel_info's), then busy with the queued cell (busy
    as soon as the execute_request arrives); history is answered at once;
    the first output after subscribing is the queue note; the estimate reads
    as a person would, and the time waited advances with each update."""
    from jupyter_client.manager import KernelManager

    cluster = lib.CLUSTERS["slurm"]
    blocker = cluster.fill_the_node()
    km = KernelManager(kernel_name=cluster.kernel_name)
    km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        # The note goes to subscribers: wait until ours is seen (JEP 65's welcome).
        _iopub_until(kc, lambda ms: any(m["msg_type"] == "iopub_welcome" for m in ms), 30)
        info_id = kc.kernel_info()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == info_id, reply
        got = _iopub_until(kc, lambda ms: ("idle", None) in _statuses(ms), 30)
        st = _statuses(got)
        assert st[:2] == [("busy", info_id), ("idle", info_id)], st
        note = lib.stream_text(m for m in got if m["parent_header"].get("msg_id") == info_id)
        assert "queued on slurm job" in note and "(partition debug)" in note, note
        exec_id = kc.execute("print('ran')")
        got = _iopub_until(kc, lambda ms: ("busy", exec_id) in _statuses(ms), 10)
        # busy came from the queued kernel itself: its job is still waiting
        kernel_job = [j for j in cluster.jobs() if j["name"] == "noyau-kernel-python3"]
        assert [j["state"] for j in kernel_job] == [cluster.pending], kernel_job
        hist_id = kc.history(hist_access_type="tail", n=10)
        reply = kc.get_shell_msg(timeout=5)
        assert reply["parent_header"]["msg_id"] == hist_id, reply
        assert reply["content"] == {"status": "ok", "history": []}, reply["content"]
        got = _iopub_until(kc, lambda ms: ("idle", hist_id) in _statuses(ms)
                           and _statuses(ms)[-1] == ("busy", exec_id), 10)
        # The note: no raw placeholder date, and "waiting for" advancing.
        notes = _iopub_until(kc, lambda ms: len([m for m in ms if m["msg_type"] == "update_display_data"]) >= 2, 40)
        texts = [lib.message_text(m) for m in notes if m["msg_type"] in ("display_data", "update_display_data")]
        waited = [re.search(r"waiting for (\S+)\.", t).group(1) for t in texts]
        assert len(set(waited)) == len(waited), texts
        for t in texts:
            assert re.search(r"start time not known yet|start in (about \d+ (min|h|days)|under a minute)", t), t
            assert "estimated start 20" not in t, t
        cluster.cancel(blocker)
        reply = kc.get_shell_msg(timeout=120)
        assert reply["parent_header"]["msg_id"] == exec_id and reply["content"]["status"] == "ok", reply
    finally:
        cluster.cancel(blocker)
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    no_noyau_job(30, "no noyau job left")


def test_kill_9_of_the_proxy_ends_the_job_after_the_grace(batch: lib.Cluster) -> None:
    k = Kernel(batch.kernel_name,
               env={"NOYAU_LINK_GIVE_UP": "5", "NOYAU_REATTACH_GRACE": "5"})
    try:
        reply, _ = k.run("x = 1", timeout=120)
        assert reply["content"]["status"] == "ok"
        assert batch.jobs()
        lib.kill(k.launched_pid, signal.SIGKILL)
        no_noyau_job(40, "the job to end once its agent gave up on the dead proxy", batch)
    finally:
        k.kc.stop_channels()
        try:
            k.km.shutdown_kernel(now=True)
        except Exception:
            pass


def test_controller_down_for_30_s_does_not_kill_the_kernel(batch: lib.Cluster) -> None:
    """The scheduler away for 30 s (slurmctld; OAR's server and database):
    its commands fail, which the watcher takes as "unknown", never as the job
    gone; the kernel lives on and cells run throughout."""
    k = Kernel(batch.kernel_name, ready_timeout=120)
    try:
        reply, _ = k.run("n = 41", timeout=120)
        assert reply["content"]["status"] == "ok"
        batch.stop_controller()
        try:
            down = time.monotonic()
            reply, iopub = k.run("n += 1; print(n)", timeout=30)
            assert lib.stream_text(iopub) == "42\n"
            # the outage lasts 30 s whatever the cell took: the watcher polls through it
            time.sleep(max(0.0, 30 - (time.monotonic() - down)))
            reply, iopub = k.run("n += 1; print(n)", timeout=30)
            assert lib.stream_text(iopub) == "43\n"
        finally:
            batch.start_controller()
        reply, iopub = k.run("n += 1; print(n)", timeout=60)
        assert reply["content"]["status"] == "ok" and lib.stream_text(iopub) == "44\n"
        assert [j["state"] for j in batch.jobs()] == [batch.running]
    finally:
        k.shutdown()
    no_noyau_job(60, "no noyau job after shutdown", batch)


def test_restart_keeps_the_job_and_its_death_is_still_seen(batch: lib.Cluster) -> None:
    """A restart hands the agent (and its allocation) to the next proxy,
    which follows the same batch job: cancelling it afterwards is reported."""
    k = Kernel(batch.kernel_name, ready_timeout=120)
    show_job = f"import os; print(os.environ[{batch.job_var!r}])"
    try:
        _, iopub = k.run(show_job, timeout=120)
        job = lib.stream_text(iopub).strip()
        assert job.isdigit()
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=120)
        _, iopub = k.run(show_job)
        assert lib.stream_text(iopub).strip() == job, "the restart lost the allocation"
        msg_id = k.execute("import time; time.sleep(120)")
        batch.cancel(job)
        reply = k.reply_for(msg_id, 30)
        assert reply["content"]["status"] == "error" and "died" in reply["content"]["evalue"], reply["content"]
    finally:
        k.shutdown()
    no_noyau_job(30, "no noyau job after the cancelled kernel", batch)


def _seconds(human: str) -> int:
    """"1 min 40 s", "2 min", "45 s" → seconds."""
    m = re.fullmatch(r"(?:(\d+) min)?\s*(?:(\d+) s)?", human.strip())
    assert m and human.strip(), human
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_walltime_warnings_reach_the_running_cell(slurm: None, prefix: Path) -> None:
    """A kernel in a 2-minute Slurm job with warning thresholds at 100 s and
    45 s before the end (NOYAU_WALLTIME_WARN; 600,60 by default, the 10- and
    1-minute warnings): a cell running through both gets each as stderr
    naming the job and the time left, in order."""
    spec = lib.read_kernelspec(prefix, lib.SLURM_KERNEL_NAME)
    spec["argv"] = [*spec["argv"], "-o", "time=00:02:00"]
    d = prefix / "share" / "jupyter" / "kernels" / "noyau-slurm-2min"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    k = Kernel("noyau-slurm-2min", env={"NOYAU_WALLTIME_WARN": "100,45"}, ready_timeout=120)
    try:
        reply, iopub = k.run("import os, time; print(os.environ['SLURM_JOB_ID'])", timeout=120)
        assert reply["content"]["status"] == "ok"
        job = lib.stream_text(iopub).strip()
        msg_id = k.execute("time.sleep(85); print('slept')")
        msgs = k.iopub_for(msg_id, lib.is_idle, 150)
        stderr = [m["content"]["text"] for m in msgs
                  if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"]
        # (the job's early SIGUSR1 adds a "walltime reached soon" notice)
        notices = [t for t in stderr if "reaches its walltime" in t]
        said = [re.search(r"the batch job (\d+) reaches its walltime in ([^;]+);", t) for t in notices]
        assert len(notices) == 2 and all(said), stderr
        assert [s.group(1) for s in said] == [job, job], notices  # type: ignore[union-attr]
        first, second = (_seconds(s.group(2)) for s in said)  # type: ignore[union-attr]
        assert 85 <= first <= 100 and 30 <= second <= 45, notices
        assert lib.stream_text(msgs) == "slept\n"
    finally:
        k.shutdown()
    no_noyau_job(30, "the kernel's job to leave the queue after shutdown")
