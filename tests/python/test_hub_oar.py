"""`noyau hub` on OAR (`scheduler = "oar"`): the main flow of test_hub.py on
the real OAR test cluster (scripts/oar-up): a PAM login of a Unix user made
by the test, the form (queues, free cores from oarnodes), a session whose
job OAR runs as that user, a cell run in its JupyterLab through the hub over
the kernel WebSocket, cancel (oardel); and one oarstat per interval for all
sessions.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import hub_testlib as hl
import noyau_testlib as lib


def oar_job(job_id: str) -> dict:
    out = subprocess.run(["oarstat", "-J", "-f", "-j", job_id], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[job_id]


def oardel_all(user: str) -> None:
    out = subprocess.run(["oarstat", "-J", "-u", user], capture_output=True, text=True).stdout.strip()
    jobs = json.loads(out) if out.startswith("{") else {}
    live = [j for j, v in jobs.items() if v.get("state") not in ("Terminated", "Error")]
    if live:
        subprocess.run(["oardel", *live], check=False, capture_output=True)


@pytest.fixture
def oar_user():  # type: ignore[no-untyped-def]
    hl.require_hub_oar_env()
    u = hl.UnixUser("nho")
    yield u
    oardel_all(u.name)
    u.remove()


def test_oar_login_spawn_run_a_cell_cancel(tmp_path: Path, oar_user) -> None:  # type: ignore[no-untyped-def]
    u = oar_user
    hub = hl.Hub(tmp_path, admins=[], scheduler="oar")
    try:
        hub.start()
        s = hub.login(u.name, u.password)
        home = s.get(hub.url + "/hub/home").text
        # OAR's words: queues, and free cores from oarnodes (shared by the queues).
        assert '<th>Queue</th>' in home and "<option>default</option>" in home
        assert "<td>all queues</td>" in home, home
        assert 'name="mem_gb" value="0"' in home  # OAR asks for no memory
        csrf = hl.csrf_of(home)
        st = hl.spawn_refused_then_running(s, hub.url, csrf, "default")
        assert st["seen"][0] == "queued" and st["node"] == "localhost" and st["job_id"]
        assert 0 < hl.secs_of(st["time_left"]) <= 600
        # The job is the user's, under the hub's job name; nothing secret on its command line.
        job = oar_job(st["job_id"])
        assert job["job_user"] == u.name and job["name"] == "noyau-hub", job
        assert "TOKEN" not in job["command"] and "PIN" not in job["command"], job["command"]

        assert hl.run_cell(s, hub.url, u.name, "6 * 7") == "42"

        hl.cancel_until_ended(s, hub.url, csrf, st)
        assert any(e["type"] == "FRAG_JOB_REQUEST" for e in oar_job(st["job_id"])["events"])
        assert s.get(f"{hub.url}/user/{u.name}/api/status").status_code == 503
    finally:
        hub.close()


def test_oar_one_oarstat_per_interval_for_all_sessions(tmp_path: Path, oar_user) -> None:  # type: ignore[no-untyped-def]
    """20 sessions (rows of the hub's database, each with a real held OAR job
    of the test user) are followed by one oarstat call per interval."""
    u = oar_user
    calls = tmp_path / "oarstat-calls"
    wrapper = tmp_path / "oarstat-counting"
    wrapper.write_text(f"#!/bin/sh\necho call >> {calls}\nexec oarstat \"$@\"\n")
    wrapper.chmod(0o755)
    hub = hl.Hub(tmp_path, admins=[], scheduler="oar", poll=0.5, oarstat=str(wrapper))
    home = Path(subprocess.run(["getent", "passwd", u.name], capture_output=True, text=True,
                               check=True).stdout.split(":")[5])
    jobs = []
    try:
        hub.start()
        for _ in range(20):
            out = subprocess.run(["runuser", "-u", u.name, "--", "env", f"PWD={home}", "oarsub", "--hold", "-n",
                                  "noyau-test-held", "-l", "walltime=0:05:00", "true"], cwd=home,
                                 capture_output=True, text=True, check=True).stdout
            jobs.append(next(l.split("=", 1)[1] for l in out.splitlines() if l.startswith("OAR_JOB_ID=")))
        hub.simulate_sessions(jobs, partition="default", mem_gb=0)

        def all_held() -> bool:
            reasons = hub.simulated_reasons()
            return len(reasons) == 20 and all(r.startswith("Hold") for r in reasons)

        lib.wait_until(all_held, 30, "the 20 sessions to show OAR's Hold state", interval=0.2)
        start_calls = len(calls.read_text().splitlines())
        t0 = time.monotonic()
        lib.wait_until(lambda: time.monotonic() - t0 > 5, 10, "5 s to pass", interval=0.1)
        n = len(calls.read_text().splitlines()) - start_calls
        elapsed = time.monotonic() - t0
        # One call per 0.5 s interval (±20 % jitter, plus oarstat's own time), not one per session.
        assert 1 <= n <= elapsed / (0.5 * 0.8) + 2, (n, elapsed)
    finally:
        if jobs:
            subprocess.run(["oardel", *jobs], check=False, capture_output=True)
        hub.close()


def test_oar_session_at_its_walltime_ends_saying_so(tmp_path: Path, oar_user) -> None:  # type: ignore[no-untyped-def]
    """A one-minute session on OAR: its card counts the time left down from
    OAR's startTime + walltime (the page warns from it), and OAR's WALLTIME
    event ends it with the reason on the card."""
    u = oar_user
    hub = hl.Hub(tmp_path, admins=[], scheduler="oar")
    try:
        hub.start()
        s = hub.login(u.name, u.password)
        csrf = hl.csrf_of(s.get(hub.url + "/hub/home").text)
        s.post(hub.url + "/hub/spawn", data={"_csrf": csrf, "profile": "cpu", "partition": "default", "cores": 1,
                                             "mem_gb": 0, "gpus": 0, "minutes": 1})
        running = hl.wait_state(s, hub.url, "running", timeout=120)
        assert 0 < hl.secs_of(running["time_left"]) <= 60
        ended = hl.wait_state(s, hub.url, "ended", timeout=240)
        assert ended["ended_why"] == "reached its walltime", ended
    finally:
        hub.close()
