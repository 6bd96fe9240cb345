"""`noyau hub` on Grid Engine (`scheduler = "sge"`): the main flow of
test_hub.py on the real Grid Engine test cluster (scripts/sge-up): a PAM
login of a Unix user made by the test, the form (queues, free slots), a
session whose job Grid Engine runs as that user, a cell run in its
JupyterLab through the hub over the kernel WebSocket, and cancel (qdel).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import hub_testlib as hl
import noyau_testlib as lib


def user_jobs(user: str) -> list[dict[str, str]]:
    """The user's jobs Grid Engine still lists (qstat shows only the caller's by default)."""
    out = subprocess.run(["qstat", "-u", user, "-xml"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [{"id": j.findtext("JB_job_number", ""), "name": j.findtext("JB_name", ""),
             "owner": j.findtext("JB_owner", ""), "state": j.findtext("state", "")}
            for j in ET.fromstring(out).iter("job_list")]


@pytest.fixture
def sge_user():  # type: ignore[no-untyped-def]
    hl.require_hub_sge_env()
    u = hl.UnixUser("nhs")
    yield u
    left = [j["id"] for j in user_jobs(u.name)]
    if left:
        subprocess.run(["qdel", *left], check=False, capture_output=True)
    lib.wait_until(lambda: not user_jobs(u.name), 60, "the test user's jobs to leave Grid Engine", 0.5)
    u.remove()
    assert not left, f"jobs left in Grid Engine: {left}"


def test_sge_login_spawn_run_a_cell_cancel(tmp_path: Path, sge_user) -> None:  # type: ignore[no-untyped-def]
    u = sge_user
    hub = hl.Hub(tmp_path, admins=[], scheduler="sge")
    try:
        hub.start()
        s = hub.login(u.name, u.password)
        home = s.get(hub.url + "/hub/home").text
        assert "<th>Queue</th>" in home and "<option>all.q</option>" in home, home
        csrf = hl.csrf_of(home)
        st = hl.spawn_refused_then_running(s, hub.url, csrf, "all.q")
        assert st["job_id"] and 0 < hl.secs_of(st["time_left"]) <= 600, st
        # The job is the user's, under the hub's job name.
        job = next(j for j in user_jobs(u.name) if j["id"] == st["job_id"])
        assert job["owner"] == u.name and job["name"] == "noyau-hub", job

        assert hl.run_cell(s, hub.url, u.name, "6 * 7") == "42"

        hl.cancel_until_ended(s, hub.url, csrf, st)
        lib.wait_until(lambda: not user_jobs(u.name), 60, "the session's job to leave Grid Engine", 0.5)
        assert s.get(f"{hub.url}/user/{u.name}/api/status").status_code == 503
    finally:
        hub.close()
