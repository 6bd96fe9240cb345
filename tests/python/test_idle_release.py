"""Idle allocations given back (issue 23): a kernel on the test Slurm (and
OAR) whose job has been idle for its limit (on Slurm `[idle] kernel` in the
user's config file, as a user would write it; on OAR, whose kernels run as
the test user with a HOME of their own, `NOYAU_KERNEL_IDLE`) releases the job; the notebook is told; the
kernel stays connected; the next cell runs in a new job and says that the
variables were lost. Activity (requests on the `noyau` comm, cells) keeps
the job; the comm's own periodic state pushes do not. The local backend is
never released (crates/noyau-proxy/src/idle.rs's unit tests).
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
import uuid
from pathlib import Path

import noyau_testlib as lib
from noyau_testlib import Kernel
from test_comm import Comm, is_state, opened

LIMIT_S = 30


def idle_limited_kernel(tmp_path: Path, batch: lib.Cluster = lib.CLUSTERS["slurm"]) -> Kernel:
    """A kernel with a 30 s limit: on Slurm from its user config (the
    session's, plus `[idle]`), elsewhere from the environment."""
    if batch.name != "slurm":
        return Kernel(batch.kernel_name, env={"NOYAU_KERNEL_IDLE": str(LIMIT_S)})
    xdg = tmp_path / "xdg-config"
    cfg = xdg / "noyau" / "config.toml"
    cfg.parent.mkdir(parents=True)
    session = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
    cfg.write_text(session.read_text() + f'\n[idle]\nkernel = "0:{LIMIT_S}"\n')
    return Kernel(lib.SLURM_KERNEL_NAME, env={"XDG_CONFIG_HOME": str(xdg),
                                              "NOYAU_KERNEL_IDLE": None})


def job_of(k: Kernel, batch: lib.Cluster = lib.CLUSTERS["slurm"]) -> str:
    reply, iopub = k.run(f"import os; print(os.environ[{batch.job_var!r}])", timeout=120)
    assert reply["content"]["status"] == "ok", reply["content"]
    return lib.stream_text(iopub).strip()


def in_queue(job: str, batch: lib.Cluster = lib.CLUSTERS["slurm"]) -> bool:
    return any(j["id"] == job for j in batch.jobs())


def drain(k: Kernel, into: list[dict]) -> None:
    while True:
        try:
            into.append(k.kc.get_iopub_msg(timeout=0.2))
        except queue.Empty:
            return


def test_an_idle_job_is_released_and_the_next_cell_runs_in_a_new_one(slurm_or_oar: lib.Cluster, tmp_path: Path) -> None:
    batch = slurm_or_oar
    k = idle_limited_kernel(tmp_path, batch)
    try:
        c = Comm(k)
        first = opened(c)
        assert first["idle"]["release_after_s"] == LIMIT_S, first["idle"]
        reply, _ = k.run("x = 1", timeout=120)
        assert reply["content"]["status"] == "ok"
        job = job_of(k, batch)
        assert in_queue(job, batch)
        # Only the proxy's own state pushes (every 5 s) while idle: released.
        seen: list[dict] = []
        t0 = time.monotonic()
        lib.wait_until(lambda: drain(k, seen) or not in_queue(job, batch), LIMIT_S + 60,
                       "the idle job to leave the queue")
        assert time.monotonic() - t0 >= LIMIT_S - 5, "released before its limit"
        lib.wait_until(lambda: drain(k, seen) or any(
            "was released at" in lib.message_text(m) for m in seen if m["msg_type"] == "stream"),
            15, "the release note")
        note = next(m for m in seen if m["msg_type"] == "stream" and "was released at" in lib.message_text(m))
        text = lib.message_text(note)
        assert f"{batch.name} job {job} was released at" in text and "UTC" in text and "idle for" in text, text
        assert note["content"]["name"] == "stderr", note
        # no "kernel died", link lost or walltime message for a release the proxy did
        texts = " ".join(lib.message_text(m) for m in seen if m["msg_type"] in ("stream", "error"))
        assert "died" not in texts and "lost for good" not in texts and "walltime" not in texts, texts
        states = [m["content"]["data"] for m in seen if is_state(m) and m["content"]["comm_id"] == c.id]
        assert any(s["idle"]["released_at"] and s["idle"]["released_job"] == job for s in states), \
            [s["idle"] for s in states]
        assert [m["content"]["execution_state"] for m in seen if m["msg_type"] == "status"][-1] == "idle"
        # Still connected: the proxy answers as while a job is queued.
        info = k.kc.kernel_info(reply=True, timeout=10)
        assert "released" in info["content"]["banner"], info["content"]
        assert not batch.jobs(), "no job while released"
        # The next cell: a new job, the variables lost, then NameError.
        msg_id = k.execute(f"import os; print(os.environ[{batch.job_var!r}]); print(x)")
        msgs = k.iopub_for(msg_id, lib.is_idle, 120)
        reply = k.reply_for(msg_id, 10)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "NameError", reply["content"]
        types = [m["msg_type"] for m in msgs]
        assert types[0] == "status" and msgs[0]["content"]["execution_state"] == "busy", types
        lost = [m for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
                and "variables were lost" in lib.message_text(m)]
        assert lost, [lib.message_text(m) for m in msgs]
        assert f"job {job} was released" in lib.message_text(lost[0])
        assert msgs.index(lost[0]) < types.index("error"), types
        new_job = lib.stream_text(msgs).strip()
        assert new_job and new_job != job, (job, new_job)
        assert [j["id"] for j in batch.jobs()] == [new_job]
        # the clock starts again in the new job: the comm says so
        s = c.state(lambda s: s["job"]["id"] == new_job, 15, "the new job in the comm's state")
        assert s["idle"]["released_at"] is None and s["idle"]["release_after_s"] == LIMIT_S, s["idle"]
    finally:
        k.shutdown()
    lib.wait_until(lambda: not batch.jobs(), 30, "no noyau job left after shutdown")


def test_activity_keeps_the_job(slurm: None, tmp_path: Path) -> None:
    """A widget's comm messages (another comm target than `noyau`) every
    ~5 s, then cells every ~10 s, each for longer than the limit: the same
    job all along, and its variables."""
    k = idle_limited_kernel(tmp_path)
    try:
        c = Comm(k)
        opened(c)
        reply, _ = k.run("x = 1", timeout=120)
        assert reply["content"]["status"] == "ok"
        job = job_of(k)

        def next_push() -> None:
            # the proxy's own state, every 5 s: the pace (not activity)
            c.messages(lambda m: is_state(m) and m["parent_header"].get("msg_id") == c.open_id,
                       15, "the comm's periodic state")

        widget = uuid.uuid4().hex
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < LIMIT_S + 15:
            n += 1
            # what a widget's frontend sends when the user moves a slider
            msg = k.kc.session.msg("comm_msg", {"comm_id": widget, "data": {
                "method": "update", "state": {"value": n}, "buffer_paths": []}})
            k.kc.shell_channel.send(msg)
            next_push()
            assert in_queue(job), f"released after {time.monotonic() - t0:.0f} s of widget messages"
        t0 = time.monotonic()
        while time.monotonic() - t0 < LIMIT_S + 15:
            reply, iopub = k.run("x += 1; print(x)", timeout=30)
            assert reply["content"]["status"] == "ok", reply["content"]
            next_push()
            next_push()
            assert in_queue(job), f"released after {time.monotonic() - t0:.0f} s of cells"
        assert job_of(k) == job
    finally:
        k.shutdown()
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_a_notebook_tab_left_open_does_not_keep_the_job(slurm: None, tmp_path: Path) -> None:
    """The JupyterLab extension pings the `noyau` comm every 30 s and asks
    for refreshes: no user is behind them, the idle job is released."""
    k = idle_limited_kernel(tmp_path)
    try:
        c = Comm(k)
        opened(c)
        job = job_of(k)
        t0 = time.monotonic()
        n = 0
        while in_queue(job):
            assert time.monotonic() - t0 < LIMIT_S + 60, "still not released while only pinged"
            n += 1
            r, _ = c.request({"id": f"p{n}", "action": "ping" if n % 2 else "refresh"})
            assert r["ok"], r
            # the next state push (every 5 s) paces the pings
            c.messages(lambda m: is_state(m) and m["parent_header"].get("msg_id") == c.open_id,
                       15, "the comm's periodic state")
        assert time.monotonic() - t0 >= LIMIT_S - 5, "released before its limit"
        assert n >= LIMIT_S // 5 - 1, f"only {n} pings"
    finally:
        k.shutdown()
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_a_restart_after_the_release_submits_a_new_job(slurm: None, tmp_path: Path) -> None:
    k = idle_limited_kernel(tmp_path)
    try:
        job = job_of(k)
        lib.wait_until(lambda: not in_queue(job), LIMIT_S + 60, "the idle job to leave the queue")
        k.km.restart_kernel()
        k.kc.wait_for_ready(timeout=60)
        new_job = job_of(k)
        assert new_job != job and in_queue(new_job), (job, new_job)
    finally:
        k.shutdown()
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def kernel_jobs() -> list[dict]:
    return [j for j in lib.squeue_noyau() if j["name"].startswith("noyau-kernel")]


def stays(job: str, for_s: float) -> float | None:
    """None when `job` stays in the queue `for_s` seconds from now, else
    after how long it left."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < for_s:
        if not any(j["id"] == job for j in kernel_jobs()):
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def test_a_job_queued_past_the_limit_is_not_released_as_it_starts(slurm: None) -> None:
    """Idle time counts from the job's start: a wait in the queue longer
    than the limit is not idleness of the allocation."""
    blocker = lib.fill_the_node()
    k = None
    try:
        k = Kernel(lib.SLURM_KERNEL_NAME, env={"NOYAU_KERNEL_IDLE": "15"})
        lib.wait_until(lambda: any(j["state"] == "PENDING" for j in kernel_jobs()), 30, "kernel job pending")
        job = kernel_jobs()[0]["id"]
        t0 = time.monotonic()
        lib.wait_until(lambda: time.monotonic() - t0 > 25, 30, "queued past the limit", interval=0.5)
        subprocess.run(["scancel", blocker], check=False)
        lib.wait_until(lambda: any(j["id"] == job and j["state"] == "RUNNING" for j in kernel_jobs()), 60,
                       "kernel job running")
        gone = stays(job, 12)
        assert gone is None, f"job {job} released {gone:.1f} s after it started (it had queued past the limit)"
    finally:
        subprocess.run(["scancel", blocker], check=False)
        if k:
            k.shutdown()
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_a_long_target_cell_does_not_release_the_kernel_right_after(slurm: None, tmp_path: Path) -> None:
    """A `%%noyau on` cell longer than the limit keeps the kernel busy: its
    idle time starts when the cell ends."""
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    km = lib.kernel_in(lib.SLURM_KERNEL_NAME, tmp_path, env={"NOYAU_KERNEL_IDLE": "15"})
    try:
        r = km.kc.execute("x = 1", reply=True, timeout=120)
        assert r["content"]["status"] == "ok"
        job = kernel_jobs()[0]["id"]
        r = km.kc.execute("%%noyau on side\nimport time; time.sleep(30)", reply=True, timeout=120)
        assert r["content"]["status"] == "ok", r["content"]
        gone = stays(job, 12)
        assert gone is None, f"kernel job {job} released {gone:.1f} s after a 30 s target cell ended"
    finally:
        lib.stop_kernel(km)
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_a_dask_up_cell_waiting_for_its_jobs_keeps_the_kernel(slurm: None, tmp_path: Path) -> None:
    """`%noyau dask up` waits for its jobs (the node is full) longer than
    the limit: the kernel is busy all along, its cell still waits."""
    from test_dask import PROFILE, end_cluster_jobs
    (tmp_path / "noyau.toml").write_text(PROFILE)
    km = lib.kernel_in(lib.SLURM_KERNEL_NAME, tmp_path, env={"NOYAU_KERNEL_IDLE": "20"})
    blocker = None
    try:
        r = km.kc.execute("x = 1", reply=True, timeout=120)
        assert r["content"]["status"] == "ok"
        job = kernel_jobs()[0]["id"]
        blocker = subprocess.run(
            ["sbatch", "--parsable", "-p", "batch", "-J", "noyau-test-blocker", "-c", str(lib.slurm_node_cpus() - 1),
             "--mem", "100M", "-t", "5", "-o", "/dev/null", "--wrap", "sleep 300"],
            capture_output=True, text=True, check=True).stdout.strip()
        lib.wait_until(lambda: any(j["id"] == blocker and j["state"] == "RUNNING" for j in lib.squeue_noyau()),
                       30, "the blocker to run")
        content = None
        try:
            content = km.kc.execute_interactive("%noyau dask up 1 --target hpc", timeout=60)["content"]
        except TimeoutError:
            pass  # still waiting for its jobs after 3 limits: as it should
        assert content is None, f"the dask up cell ended: {content}"
        assert any(j["id"] == job for j in kernel_jobs()), "the kernel's job was released"
    finally:
        if blocker:
            subprocess.run(["scancel", blocker], check=False)
        lib.stop_kernel(km)
        end_cluster_jobs(60)
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_an_idle_target_is_released_and_said_and_the_counts_start_again(slurm: None, tmp_path: Path) -> None:
    """A target idle past its limit: the notebook is told, and the next
    `%%noyau on` cell says its variables were lost. The kernel released
    after it: a silent execution neither resubmits nor counts, an
    is_complete_request is `unknown`, and the new kernel counts from 1."""
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    km = lib.kernel_in(lib.SLURM_KERNEL_NAME, tmp_path,
                       env={"NOYAU_KERNEL_IDLE": "30", "NOYAU_TARGET_IDLE": "10"})
    kc = km.kc
    seen: list[dict] = []
    try:
        for code in ["x = 1", "%%noyau on side\ny = 5", "x"]:
            r = kc.execute(code, reply=True, timeout=120)
            assert r["content"]["status"] == "ok", r["content"]
        job = kernel_jobs()[0]["id"]

        def said(text: str) -> bool:
            while True:
                try:
                    seen.append(kc.get_iopub_msg(timeout=0.2))
                except queue.Empty:
                    break
            return any(text in lib.message_text(m) for m in seen if m["msg_type"] == "stream")

        lib.wait_until(lambda: said("target side was idle for"), 40, "the target's release note")
        lib.wait_until(lambda: said(f"job {job} was released at"), 60, "the kernel's release note")
        # a frontend's own silent code: answered here, no new job
        r = kc.execute("1", silent=True, reply=True, timeout=10)
        assert r["content"]["status"] == "error" and r["content"]["ename"] == "AllocationReleased", r["content"]
        asked = kc.is_complete("x = (")
        r = lib.wait_until(lambda: (m := kc.get_shell_msg(timeout=10))["parent_header"].get("msg_id") == asked
                           and m, 15, "the is_complete_reply")
        assert r["content"]["status"] == "unknown", r["content"]
        assert not kernel_jobs(), "a silent execution resubmitted the job"
        r = kc.execute("z = 2", reply=True, timeout=120)
        assert r["content"]["status"] == "ok" and r["content"]["execution_count"] == 1, r["content"]
        out: list[dict] = []
        r = kc.execute_interactive("%%noyau on side\nprint(y)", timeout=60, output_hook=out.append)
        assert r["content"]["status"] == "error" and r["content"]["ename"] == "NameError", r["content"]
        texts = [lib.message_text(m) for m in out]
        assert any("target side was released at" in t and "variables were lost" in t for t in texts), texts
        assert r["content"]["execution_count"] == 2, r["content"]
    finally:
        lib.stop_kernel(km)
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")


def test_the_resubmit_note_names_the_data_to_add_again(slurm: None, tmp_path: Path) -> None:
    """`%noyau data` ran in the released job: the next cell's note says
    that those cells must be run again (the new job has none of it)."""
    import hashlib
    src = tmp_path / "t.csv"
    src.write_bytes(b"x,y\n1,2\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    km = lib.kernel_in(lib.SLURM_KERNEL_NAME, tmp_path, env={"NOYAU_KERNEL_IDLE": "15"})
    kc = km.kc
    try:
        r = kc.execute("x = 1", reply=True, timeout=120)  # the job runs
        assert r["content"]["status"] == "ok", r["content"]
        r = kc.execute(f"%noyau data file://{src} --sha256 {sha} --name t.csv", reply=True, timeout=120)
        assert r["content"]["status"] == "ok", r["content"]
        job = kernel_jobs()[0]["id"]
        lib.wait_until(lambda: not any(j["id"] == job for j in kernel_jobs()), 60, "the idle job's release")
        out: list[dict] = []
        r = kc.execute_interactive("1", timeout=120, output_hook=out.append)
        assert r["content"]["status"] == "ok", r["content"]
        lost = [lib.message_text(m) for m in out if "variables were lost" in lib.message_text(m)]
        assert lost and "`%noyau data`" in lost[0] and "run those cells again" in lost[0], lost
    finally:
        lib.stop_kernel(km)
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "no noyau job left after shutdown")
