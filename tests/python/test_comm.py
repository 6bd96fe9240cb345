"""The `noyau` comm (docs/comm.md) as the proxy answers it, driven with
jupyter_client against a real ipykernel behind the proxy: on the local
backend (usage from the kernel's process tree; GPUs from a STAND-IN
`nvidia-smi`, there being no GPU here), on the test Slurm while the
kernel's job is pending (the node held by another job), then running; on
OAR, whose users may extend their walltime; on the test Slurm, whose
operators may (root there) and other users may not; and with a real Dask
cluster on the test Slurm, whose worker job the comm cancels.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pytest

import noyau_testlib as lib
from noyau_testlib import Kernel
from test_dask import dask_jobs, kernel, km, run  # noqa: F401 (kernel, km: fixtures)

# A STAND-IN for nvidia-smi (no GPU on this machine): it answers the one
# query the agent makes, as a machine with one A100 would.
NVIDIA_SMI_STANDIN = """#!/bin/sh
# STAND-IN nvidia-smi for tests/python/test_comm.py: there is no GPU here.
case "$*" in
  *--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total*--format=csv,noheader,nounits*)
    echo "0, GPU-5d1c0000-stand-in, STAND-IN A100, 37, 1024, 40960" ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"""


# A STAND-IN for a hung nvidia-smi (a GPU in a bad state can hang it).
NVIDIA_SMI_HUNG_STANDIN = """#!/bin/sh
# HUNG STAND-IN nvidia-smi for tests/python/test_comm.py: it never answers.
exec sleep 613
"""


# A STAND-IN nvidia-smi that also counts its calls (one per usage sample):
# how a test sees whether the agent still samples.
NVIDIA_SMI_COUNTING_STANDIN = """#!/bin/sh
# COUNTING STAND-IN nvidia-smi for tests/python/test_comm.py: there is no GPU here.
echo sampled >> "$(dirname "$0")/calls"
echo "0, GPU-5d1c0000-stand-in, STAND-IN A100, 37, 1024, 40960"
"""


class Comm:
    """One noyau comm opened on a kernel, read through its client."""

    # comm_close messages from the kernel, by comm id (any Comm's reader
    # may be the one that reads them off IOPub)
    closed: dict[str, dict] = {}

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.id = uuid.uuid4().hex
        self.seen: list[dict] = []
        msg = k.kc.session.msg("comm_open", {"comm_id": self.id, "target_name": "noyau",
                                             "data": {"version": 1}})
        k.kc.shell_channel.send(msg)
        self.open_id = msg["header"]["msg_id"]

    def messages(self, until: Callable[[dict], bool], timeout: float, what: str) -> list[dict]:
        """IOPub messages of this comm (comm_msg data) and the statuses of
        its requests, until `until(msg)` holds."""
        deadline = time.monotonic() + timeout
        got: list[dict] = []
        while time.monotonic() < deadline:
            try:
                msg = self.k.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["msg_type"] == "comm_close":
                Comm.closed[msg["content"].get("comm_id")] = msg
            if msg["msg_type"] == "comm_msg" and msg["content"].get("comm_id") == self.id:
                self.seen.append(msg)
            elif msg["msg_type"] != "status":
                continue
            got.append(msg)
            if until(msg):
                return got
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                             f"{[m['msg_type'] + ':' + str(m['content'].get('data', {}).get('type')) for m in got][-20:]}")

    def state(self, cond: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """The first `state` (from now) for which `cond` holds."""
        msgs = self.messages(lambda m: is_state(m) and cond(m["content"]["data"]), timeout, what)
        return msgs[-1]["content"]["data"]

    def request(self, data: dict, timeout: float = 60) -> tuple[dict, list[dict]]:
        """Sends a request; its reply's data and every comm message before it,
        once the request's idle came."""
        msg = self.k.kc.session.msg("comm_msg", {"comm_id": self.id, "data": data})
        self.k.kc.shell_channel.send(msg)
        rid = msg["header"]["msg_id"]
        msgs = self.messages(lambda m: lib.is_idle(m) and m["parent_header"].get("msg_id") == rid,
                             timeout, f"the answer to {data}")
        mine = [m for m in msgs if m["parent_header"].get("msg_id") == rid]
        assert mine[0]["msg_type"] == "status" and mine[0]["content"]["execution_state"] == "busy", mine[0]
        replies = [m["content"]["data"] for m in mine if m["msg_type"] == "comm_msg"
                   and m["content"]["data"]["type"] == "reply"]
        assert len(replies) == 1 and replies[0]["request"] == data["id"], mine
        return replies[0], [m["content"]["data"] for m in mine if m["msg_type"] == "comm_msg"]

    def close(self) -> None:
        msg = self.k.kc.session.msg("comm_close", {"comm_id": self.id, "data": {}})
        self.k.kc.shell_channel.send(msg)


def is_state(msg: dict) -> bool:
    return msg["msg_type"] == "comm_msg" and msg["content"]["data"].get("type") == "state"


def opened(c: Comm, timeout: float = 30) -> dict:
    """The comm_open's answer: busy, a state at once, idle; the state."""
    msgs = c.messages(lambda m: lib.is_idle(m) and m["parent_header"].get("msg_id") == c.open_id,
                      timeout, "the comm_open's idle")
    mine = [m for m in msgs if m["parent_header"].get("msg_id") == c.open_id]
    assert [m["msg_type"] for m in mine] == ["status", "comm_msg", "status"], mine
    assert mine[0]["content"]["execution_state"] == "busy"
    state = mine[1]["content"]["data"]
    assert state["type"] == "state" and state["version"] == 1, state
    return state


def comm_info(k: Kernel, **content: Any) -> dict:
    msg = k.kc.session.msg("comm_info_request", content)
    k.kc.shell_channel.send(msg)
    return k.reply_for(msg["header"]["msg_id"], 30)["content"]


def refused(c: Comm, data: dict, says: str) -> None:
    reply, _ = c.request(data)
    assert reply["ok"] is False and says in reply["message"], reply


def with_nvidia_smi(tmp_path: Path, script: str) -> dict:
    """A kernel's environment whose PATH finds `script` as nvidia-smi first."""
    standin = tmp_path / "standin-bin"
    standin.mkdir()
    (standin / "nvidia-smi").write_text(script)
    (standin / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{standin}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": None}


def test_local_kernel_comm_state_usage_and_requests(tmp_path: Path) -> None:
    lib.require_noyau()
    k = Kernel(lib.NOYAU_KERNEL_NAME, env=with_nvidia_smi(tmp_path, NVIDIA_SMI_STANDIN))
    try:
        # A comm of the inner kernel's own, to be listed with the noyau one.
        reply, _ = k.run("import comm; other = comm.create_comm(target_name='someone-else')")
        assert reply["content"]["status"] == "ok", reply
        c = Comm(k)
        state = opened(c)
        assert state["backend"] == "local" and state["job"] is None, state
        assert state["can"]["extend"] is False and state["can"]["log"] is False, state
        info = comm_info(k)
        targets = {v["target_name"] for v in info["comms"].values()}
        assert info["comms"][c.id] == {"target_name": "noyau"} and "someone-else" in targets, info
        assert list(comm_info(k, target_name="noyau")["comms"]) == [c.id]

        sampled = c.state(lambda s: s["usage"] is not None, 30, "a first usage sample")
        first = sampled["usage"]
        assert first["source"] == "process-tree" and first["mem_limit_bytes"] is None, first
        # the profile names no cores: the ones the agent may use (its CPU set)
        assert sampled["resources"]["cpus"] == len(os.sched_getaffinity(0)), sampled["resources"]
        # the STAND-IN nvidia-smi's GPU
        assert first["gpus"] == [{"index": 0, "name": "STAND-IN A100", "util_percent": 37.0,
                                  "mem_used_bytes": 1 << 30, "mem_total_bytes": 40 << 30}], first
        reply, _ = k.run("block = b'x' * (200 << 20)")
        assert reply["content"]["status"] == "ok"
        grown = c.state(lambda s: s["usage"]["mem_bytes"] > first["mem_bytes"] + (150 << 20), 30,
                        "memory use to grow by the 200 MB the cell allocated")
        print(f"memory {first['mem_bytes'] >> 20} MiB -> {grown['usage']['mem_bytes'] >> 20} MiB")
        msg_id = k.execute("import time\nt = time.monotonic()\nwhile time.monotonic() - t < 12: pass")
        busy = c.state(lambda s: (s["usage"]["cpu_percent"] or 0) > 40, 30, "the busy cell's CPU use")
        print(f"cpu {busy['usage']['cpu_percent']:.0f}% while a cell spins")
        k.reply_for(msg_id, 30)

        reply, before = c.request({"id": "r1", "action": "refresh"})
        assert reply["ok"] and before[0]["type"] == "state", before
        refused(c, {"id": "r2", "action": "extend", "duration": "1:00:00"}, "local backend")
        refused(c, {"id": "r3", "action": "log", "job": None, "lines": 20}, "local backend")
        refused(c, {"id": "r4", "action": "cancel", "job": "12345"}, "not one of this kernel's")
        refused(c, {"id": "r5", "action": "release", "target": "nope"}, "nope")
        refused(c, {"id": "r6", "action": "rm -rf"}, "it knows refresh")
        # cells still run, the comm never reached the inner kernel
        reply, iopub = k.run("print(len(other.kernel.comm_manager.comms))")
        assert lib.stream_text(iopub).strip() == "1", iopub
        c.close()
        lib.wait_until(lambda: c.id not in comm_info(k)["comms"], 30, "the closed comm to be forgotten")
    finally:
        k.shutdown()


def test_a_comm_request_during_a_cell_leaves_the_kernel_busy() -> None:
    """The proxy's busy/idle around a comm request must not read as the
    kernel's: while a cell runs, busy follows (for that cell), or
    JupyterLab and the server's culler would take the kernel for idle."""
    lib.require_noyau()
    k = Kernel(lib.NOYAU_KERNEL_NAME)
    try:
        c = Comm(k)
        opened(c)
        cell = k.execute("import time; time.sleep(6)")
        c.messages(lambda m: m["parent_header"].get("msg_id") == cell
                   and m["content"]["execution_state"] == "busy", 30, "the cell's busy")
        reply, _ = c.request({"id": "r1", "action": "refresh"})
        assert reply["ok"], reply
        after = c.messages(lambda m: m["parent_header"].get("msg_id") == cell, 30,
                           "the next status of the running cell")[-1]
        assert after["content"]["execution_state"] == "busy", after
        k.reply_for(cell, 30)
    finally:
        k.shutdown()


def pinged(c: Comm, n: list[int]) -> bool:
    """One ping on `c`, answered."""
    n[0] += 1
    reply, _ = c.request({"id": f"p{n[0]}", "action": "ping"})
    assert reply["ok"] and reply["message"] == "pong", reply
    return True


def test_a_silent_comm_expires_and_usage_sampling_stops(tmp_path: Path) -> None:
    """A frontend gone without comm_close (a tab closed, a browser crashed)
    must not keep the kernel sampling and pushing states for ever: a comm
    not heard from for NOYAU_COMM_EXPIRE seconds (150 by default; 4 here)
    is closed by the kernel (comm_close, reason `expired`), one that pings
    stays; with none left the agent stops sampling (the COUNTING STAND-IN
    nvidia-smi is no longer called)."""
    lib.require_noyau()
    env = with_nvidia_smi(tmp_path, NVIDIA_SMI_COUNTING_STANDIN)
    calls = tmp_path / "standin-bin" / "calls"
    k = Kernel(lib.NOYAU_KERNEL_NAME, env={**env, "NOYAU_COMM_EXPIRE": "4"})
    try:
        live, gone = Comm(k), Comm(k)
        opened(live)
        opened(gone)
        t0 = time.monotonic()
        n = [0]
        # the live frontend pings every second; the other one is silent
        lib.wait_until(lambda: pinged(live, n) and gone.id in Comm.closed, 30,
                       "the silent comm to be closed by the kernel", interval=1)
        silent_for = time.monotonic() - t0
        close = Comm.closed[gone.id]
        assert close["content"]["data"] == {"reason": "expired"}, close
        assert close["parent_header"]["msg_id"] == gone.open_id, close
        assert silent_for >= 3.5, f"closed after {silent_for:.1f} s of silence, before its 4 s"
        assert live.id not in Comm.closed
        assert list(comm_info(k, target_name="noyau")["comms"]) == [live.id]
        assert calls.is_file(), "the agent never sampled (the stand-in was not called)"
        # the live one falls silent too: closed, and sampling stops
        deadline = time.monotonic() + 30
        while live.id not in Comm.closed:
            assert time.monotonic() < deadline, "the second comm was not closed once silent"
            try:
                live.messages(lambda m: live.id in Comm.closed, 1, "the second comm's close")
            except AssertionError:
                pass
        assert comm_info(k)["comms"] == {}
        before = calls.read_text().count("sampled")
        # no comm: no sample for two intervals (5 s each; one may have been under way)
        observed = time.monotonic() + 11
        while time.monotonic() < observed:
            try:
                msg = k.kc.get_iopub_msg(timeout=0.5)
                assert msg["msg_type"] != "comm_msg", msg
            except queue.Empty:
                pass
        after = calls.read_text().count("sampled")
        assert after <= before + 1, f"the agent still samples with no comm open ({before} -> {after} calls)"
        reply, _ = k.run("print('still here')")
        assert reply["content"]["status"] == "ok", reply
    finally:
        k.shutdown()


def test_a_kernel_holds_at_most_eight_noyau_comms() -> None:
    """The ninth comm_open closes the comm heard from least recently."""
    lib.require_noyau()
    k = Kernel(lib.NOYAU_KERNEL_NAME)
    try:
        comms = []
        for _ in range(8):
            comms.append(Comm(k))
            opened(comms[-1])
        reply, _ = comms[0].request({"id": "p1", "action": "ping"})
        assert reply["ok"], reply
        ninth = Comm(k)
        opened(ninth)
        # (the close comes within the ninth's comm_open answer)
        assert comms[1].id in Comm.closed, "the ninth comm did not close the most silent one"
        assert Comm.closed[comms[1].id]["content"]["data"] == {"reason": "expired"}
        listed = set(comm_info(k, target_name="noyau")["comms"])
        assert listed == {c.id for c in comms if c is not comms[1]} | {ninth.id}, listed
    finally:
        k.shutdown()


def sleeping_613() -> list[int]:
    """The hung stand-in's processes (`sleep 613`) still alive."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes() == b"sleep\x00613\x00":
                found.append(int(d.name))
        except OSError:
            pass
    return found


def test_a_hung_nvidia_smi_never_holds_the_kernel(tmp_path: Path) -> None:
    """Sampling runs beside the agent's loop: with an nvidia-smi that never
    answers, cells still run, usage still comes (without GPUs once it timed
    out), and the hung process is killed."""
    lib.require_noyau()
    k = Kernel(lib.NOYAU_KERNEL_NAME, env=with_nvidia_smi(tmp_path, NVIDIA_SMI_HUNG_STANDIN))
    try:
        c = Comm(k)
        opened(c)
        # the first sample is waiting on nvidia-smi now: the kernel answers
        reply, _ = k.run("print(6 * 7)", timeout=30)
        assert reply["content"]["status"] == "ok", reply
        sampled = c.state(lambda s: s["usage"] is not None, 60, "a usage sample without GPUs")
        assert sampled["usage"]["gpus"] == [] and sampled["usage"]["mem_bytes"] > 0, sampled
        assert not sleeping_613(), "the hung nvidia-smi was not killed"
    finally:
        k.shutdown()


def test_slurm_comm_while_queued_then_running(slurm: None) -> None:
    cluster = lib.CLUSTERS["slurm"]
    blocker = cluster.fill_the_node()
    k = None
    try:
        k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=30)
        c = Comm(k)
        state = opened(c)
        jobs = [j for j in cluster.jobs() if j["name"] == "noyau-kernel-python3"]
        assert [j["state"] for j in jobs] == [cluster.pending], jobs
        job = state["job"]
        assert state["backend"] == "slurm" and job["id"] == jobs[0]["id"], state
        assert job["state"] == "pending" and job["partition"] == "debug", state
        assert job["warnings_s"] == [600, 60] and state["usage"] is None, state
        # answered by the proxy itself while the job waits
        assert list(comm_info(k)["comms"]) == [c.id]
        if job["reason"] not in ("Resources", "Priority"):
            job = c.state(lambda s: s["job"]["reason"] in ("Resources", "Priority"), 60,
                          "Slurm's reason for the wait")["job"]
        cluster.cancel(blocker)
        running = c.state(lambda s: s["job"]["state"] == "running", 120, "the job to run")["job"]
        assert running["node"] and running["ends_at"] and running["started_at"], running
        usage = c.state(lambda s: s["usage"] is not None, 120, "a usage sample from the job")["usage"]
        assert usage["mem_bytes"] > 0 and usage["source"] in ("cgroup", "process-tree"), usage
        reply, msgs = c.request({"id": "r1", "action": "log", "job": None, "lines": 50})
        assert reply["ok"], reply
        logs = [m for m in msgs if m["type"] == "log"]
        assert logs and "agent" in logs[0]["text"], msgs
        reply, _ = k.run("print('ran after the queue')", timeout=60)
        assert reply["content"]["status"] == "ok"
        # the inner kernel answers comm_info now; the noyau comm is added
        assert c.id in comm_info(k)["comms"]
    finally:
        cluster.cancel(blocker)
        if k:
            k.shutdown()
    lib.wait_until(lambda: not cluster.jobs(), 60, "the kernel's job to end", interval=0.5)


def ends_at(state: dict) -> float:
    return datetime.fromisoformat(state["job"]["ends_at"].replace("Z", "+00:00")).timestamp()


def ends_later(c: Comm, than: dict, minutes: int, timeout: float) -> dict:
    """The first state whose ends_at is `minutes` later than `than`'s (a minute's slack)."""
    return c.state(lambda s: ends_at(s) >= ends_at(than) + (minutes - 1) * 60, timeout,
                   f"a state whose ends_at is {minutes} minutes later")


@pytest.mark.parametrize("batch", ["oar"], indirect=True)
def test_oar_comm_extends_the_walltime(batch: lib.Cluster) -> None:
    """OAR lets users extend (oarwalltime): offered, done, and the next
    state's `ends_at` is later by what was asked."""
    k = Kernel(batch.kernel_name, ready_timeout=60)
    try:
        c = Comm(k)
        state = opened(c)
        assert state["backend"] == "oar", state
        # offered once the job has an end to push back
        running = c.state(lambda s: s["job"]["state"] == "running" and s["job"]["ends_at"]
                          and s["can"]["extend"] is True, 180, "the job to run with a walltime, extend offered")
        reply, _ = c.request({"id": "e1", "action": "extend", "duration": "0:05:00"}, timeout=120)
        assert reply["ok"], reply
        later = ends_later(c, running, 5, 120)
        print(f"ends_at {running['job']['ends_at']} -> {later['job']['ends_at']}: {reply['message']}")
    finally:
        k.shutdown()
    lib.wait_until(lambda: not batch.jobs(), 60, "the kernel's job to end", interval=0.5)


def slurm_limit(job: str) -> str:
    """The job's time limit as squeue shows it (`10:00`)."""
    return subprocess.run(["squeue", "-h", "-o", "%l", "-j", job], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()


def agent_sees_left_above(c: Comm, secs: int) -> bool:
    """The job's log (the comm's `log` action) has the agent's "walltime:
    seconds left" with more than `secs` left."""
    reply, msgs = c.request({"id": f"l{uuid.uuid4().hex[:6]}", "action": "log", "job": None, "lines": 400})
    text = "".join(m["text"] for m in msgs if m["type"] == "log")
    return any(int(n) > secs for n in re.findall(r"walltime: seconds left.*?left=(\d+)", text))


def test_slurm_comm_and_noyau_extend_raise_the_time_limit_of_an_operator(slurm: None) -> None:
    """Root is one of Slurm's operators (so is the SlurmUser, root on the
    test cluster): offered; the comm's extend and `noyau extend` raise the
    job's TimeLimit (squeue) and the comm's ends_at."""
    k = Kernel(lib.SLURM_KERNEL_NAME, ready_timeout=60)
    try:
        c = Comm(k)
        opened(c)
        running = c.state(lambda s: s["can"]["extend"] is True and s["job"]["state"] == "running"
                          and s["job"]["ends_at"], 120, "a running job with a walltime, extend offered")
        job = running["job"]["id"]
        assert slurm_limit(job) == "10:00"
        reply, _ = c.request({"id": "e1", "action": "extend", "duration": "5:00"}, timeout=60)
        # an absolute limit (TimeLimit=+N wraps on an UNLIMITED job before Slurm 23.11.1)
        assert reply["ok"] and f"scontrol update JobId={job} TimeLimit=15)" in reply["message"], reply
        assert slurm_limit(job) == "15:00"
        later = ends_later(c, running, 5, 60)
        # the agent's walltime watcher, in the job, sees it at its next poll (30 s)
        t0 = time.monotonic()
        lib.wait_until(lambda: agent_sees_left_above(c, 12 * 60), 60,
                       "the agent to log the longer walltime", interval=2)
        print(f"the agent saw the new limit after {time.monotonic() - t0:.0f} s")
        # `noyau extend` finds the scheduler in the session's config (scheduler = "slurm")
        r = subprocess.run([lib.noyau_bin(), "extend", job, "10:00"], capture_output=True, text=True,
                           timeout=60)  # type: ignore[list-item]
        assert r.returncode == 0 and "raised the time limit" in r.stdout, (r.stdout, r.stderr)
        assert slurm_limit(job) == "25:00"
        c.request({"id": "r1", "action": "refresh"})
        latest = ends_later(c, later, 10, 60)
        print(f"ends_at {running['job']['ends_at']} -> {later['job']['ends_at']} -> {latest['job']['ends_at']}")
    finally:
        k.shutdown()
    lib.wait_until(lambda: not lib.squeue_noyau(), 60, "the kernel's job to end", interval=0.5)
    # a job without a limit: refused, never shortened (`TimeLimit=+N` wrapped it before 23.11.1)
    unlimited = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-J", "noyau-run-unlimited", "-t", "UNLIMITED",
                                "-c", "1", "--mem", "100M", "-o", "/dev/null", "--wrap", "sleep 300"],
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    try:
        assert slurm_limit(unlimited) == "UNLIMITED"
        r = subprocess.run([lib.noyau_bin(), "extend", unlimited, "10:00"], capture_output=True, text=True,
                           timeout=60)  # type: ignore[list-item]
        assert r.returncode != 0 and "panicked" not in r.stderr, (r.stdout, r.stderr)
        assert "this job has no time limit to raise" in r.stderr, r.stderr
        assert slurm_limit(unlimited) == "UNLIMITED"
    finally:
        subprocess.run(["scancel", unlimited], check=True, timeout=30)
        # scancel only asks: the job stays listed (COMPLETING) a moment, and
        # the fixture refuses a test that leaves one behind.
        lib.wait_until(lambda: not lib.squeue_noyau(), 60, "the unlimited job to leave the queue", interval=0.5)


def test_two_slurm_extends_of_one_job_at_once_both_count(slurm: None) -> None:
    """Two `noyau extend` of one job started at the same instant (the comm's
    button and `noyau extend`, or two clicks) each read the limit and set an
    absolute one: without the per-job lock both read 10:00 and set 15:00,
    losing one. With it, the second reads what the first set."""
    job = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-J", "noyau-run-extend2", "-t", "10", "-c", "1",
                          "--mem", "100M", "-o", "/dev/null", "--wrap", "sleep 300"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    try:
        assert slurm_limit(job) == "10:00"
        both = [subprocess.Popen([lib.noyau_bin(), "extend", "--backend", "slurm", job, "5:00"],  # type: ignore[list-item]
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in both]
        for p, (out, err) in zip(both, outs):
            assert p.returncode == 0 and "raised the time limit" in out, (out, err)
        assert slurm_limit(job) == "20:00", outs
        # one went from 10 to 15, the other from 15 to 20
        assert sum("from 10 to 15" in o for o, _ in outs) == 1, outs
        assert sum("from 15 to 20" in o for o, _ in outs) == 1, outs
        # the per-job lock file goes with the extends (one per job ever extended piled up)
        lock = Path(os.environ["XDG_STATE_HOME"]) / "noyau" / "locks" / f"slurm-extend-{job}.lock"
        assert not lock.exists(), lock
    finally:
        subprocess.run(["scancel", job], check=True, timeout=30)
        lib.wait_until(lambda: not lib.squeue_noyau(), 60, "the job to leave the queue", interval=0.5)


def test_slurm_extend_is_neither_offered_nor_done_for_an_ordinary_user(slurm: None, tmp_path: Path) -> None:
    """A user who is not one of Slurm's operators (no slurmdbd here: no
    AdminLevel) runs a kernel (its job waits behind the node's blocker):
    `can.extend` is false once the proxy has the controller's answer; on
    their running job, `noyau extend` gets Slurm's refusal and what to do,
    and the limit is unchanged."""
    if os.geteuid() != 0:
        lib.missing("making a test user needs root")
    from hub_testlib import UnixUser

    u = UnixUser("noyau-sx")
    home = Path(pwd.getpwnam(u.name).pw_dir)
    spec_dir = Path(os.environ["JUPYTER_PATH"]) / "kernels" / f"noyau-slurm-{u.name}"
    blocker, k = None, None

    def as_user(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", u.name, "--", "env", "-i", f"HOME={home}", f"USER={u.name}",
                               f"SLURM_CONF={os.environ['SLURM_CONF']}", "PATH=/usr/bin:/bin", *argv],
                              capture_output=True, text=True, timeout=60, cwd=home)
    try:
        noyau = home / "noyau"
        shutil.copy2(lib.noyau_bin(), noyau)  # type: ignore[arg-type]
        config = home / ".config" / "noyau" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(lib.SLURM_TEST_CONFIG)
        for p in (noyau, home / ".config", config.parent, config):
            shutil.chown(p, u.name, u.name)
        spec_dir.mkdir(parents=True)
        launcher = Path(__file__).with_name("oar_user_kernel.py")
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, str(launcher), "{connection_file}", u.name, "slurm", "test"],
            "display_name": "noyau slurm as a test user", "language": "python",
            "interrupt_mode": "message"}))
        blocker = lib.fill_the_node()
        log = tmp_path / "proxy.log"
        with log.open("w") as err:
            k = Kernel(spec_dir.name, ready_timeout=60, stderr=err)
        c = Comm(k)
        state = opened(c)
        assert state["backend"] == "slurm" and state["job"]["state"] == "pending", state
        lib.wait_until(lambda: "walltime extension asked of the scheduler" in log.read_text(), 30,
                       "the proxy to have the controller's answer")
        assert "offered=false" in log.read_text()
        reply, msgs = c.request({"id": "r1", "action": "refresh"})
        states = [m for m in msgs if m["type"] == "state"]
        assert reply["ok"] and states and states[-1]["can"]["extend"] is False, msgs
        k.shutdown()
        k = None
        subprocess.run(["scancel", blocker], check=True)
        # a running job of theirs: only an operator may raise its limit
        r = as_user("sbatch", "--parsable", "-p", "debug", "-J", "noyau-run-extend", "-t", "10", "-c", "1",
                    "--mem", "100M", "-o", "/dev/null", "--wrap", "sleep 300")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        lib.wait_until(lambda: as_user("squeue", "-h", "-o", "%T", "-j", job).stdout.strip() == "RUNNING",
                       60, "the user's job to run")
        r = as_user(str(noyau), "extend", job, "10:00")
        print(r.stderr)
        assert r.returncode != 0 and "panicked" not in r.stderr, (r.stdout, r.stderr)
        assert "Slurm refused to raise the time limit" in r.stderr, r.stderr
        assert "ask the site to make you one" in r.stderr and "longer `time`" in r.stderr, r.stderr
        assert slurm_limit(job) == "10:00"
    finally:
        if k:
            k.shutdown()
        if blocker:
            subprocess.run(["scancel", blocker], check=False)
        shutil.rmtree(spec_dir, ignore_errors=True)
        u.remove()


def test_dask_jobs_shown_and_a_worker_job_cancelled(km) -> None:  # type: ignore[no-untyped-def]
    """A real Dask cluster on the test Slurm (test_dask's fixtures): its jobs
    in the state; the comm cancels a worker job and refuses the scheduler's."""
    reply, text, errors = run(km, "%noyau dask up 2 --target hpc", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    c = Comm(km)

    def three_jobs(s: dict) -> bool:
        return s["dask"] is not None and len(s["dask"]["jobs"]) == 3

    state = opened(c)
    if not three_jobs(state):  # (states follow every usage sample, 5 s)
        state = c.state(three_jobs, 120, "the cluster's 3 jobs")
    dask = state["dask"]
    assert state["can"]["cancel_worker"] is True, state
    # noyau's relay (127.0.0.1, with its token), not Dask's own port on the node
    assert dask["dashboard"].startswith("http://127.0.0.1:") and "token=" in dask["dashboard"], dask
    roles = sorted(j["role"] for j in dask["jobs"])
    assert roles == ["scheduler", "worker", "worker"], dask
    queued = {j["id"] for j in dask_jobs()}
    assert {j["id"] for j in dask["jobs"]} == queued, (dask, queued)
    scheduler = next(j["id"] for j in dask["jobs"] if j["role"] == "scheduler")
    worker = next(j["id"] for j in dask["jobs"] if j["role"] == "worker")
    refused(c, {"id": "d1", "action": "cancel", "job": scheduler}, "not one of this kernel's")
    # the Dask jobs' logs, as the kernel's and the targets': the regular file of the user's only
    if not all(j["state"] == "running" for j in dask["jobs"]):
        c.state(lambda s: s["dask"] and all(j["state"] == "running" for j in s["dask"]["jobs"]), 120,
                "the cluster's jobs to run (their logs to exist)")
    for i, job in enumerate((scheduler, worker)):
        reply, msgs = c.request({"id": f"l{i}", "action": "log", "job": job, "lines": 50})
        assert reply["ok"] and f"-{job}.log" in reply["message"], reply
        assert [m for m in msgs if m["type"] == "log"], msgs
    log = Path(reply["message"].removeprefix("the end of "))
    assert log.name == f"noyau-dask-worker-{worker}.log", reply
    moved = log.with_name(log.name + ".moved")
    log.rename(moved)
    try:
        log.symlink_to(moved)  # a link planted where the log was: not followed
        reply, msgs = c.request({"id": "l2", "action": "log", "job": worker, "lines": 50})
        # (opened with O_NOFOLLOW: the kernel says "too many levels of symbolic links")
        assert reply["ok"] is False and str(log) in reply["message"], reply
        assert not [m for m in msgs if m["type"] == "log"], msgs
    finally:
        log.unlink(missing_ok=True)
        moved.rename(log)
    reply, _ = c.request({"id": "d2", "action": "cancel", "job": worker}, timeout=120)
    assert reply["ok"], reply
    lib.wait_until(lambda: worker not in {j["id"] for j in dask_jobs()}, 60,
                   "the cancelled worker job to leave squeue", interval=0.5)
    run(km, "%noyau dask down", timeout=120)

    # a target's entry carries its scheduler's end of walltime (time = "10")
    reply, text, errors = run(km, "%%noyau on hpc\nprint('on the target')", timeout=180)
    assert reply["status"] == "ok" and "on the target" in text, (text, errors)
    state = c.state(lambda s: any(t["name"] == "hpc" and t["ends_at"] for t in s["targets"]), 60,
                    "the target's end of walltime")
    target = next(t for t in state["targets"] if t["name"] == "hpc")
    assert target["state"] == "running" and target["node"], target
    left = datetime.fromisoformat(target["ends_at"].replace("Z", "+00:00")).timestamp() - time.time()
    assert 8 * 60 < left <= 10 * 60 + 5, target
