"""`noyau hub` end to end: real PAM logins of Unix users made by the test,
real Slurm jobs submitted as those users, real JupyterLab (from PyPI) on a
unix socket in the job, reached through the hub's /user/NAME/ proxy.

The browser-driven version of the first test is test_hub_browser.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

import hub_testlib as hl
import noyau_testlib as lib


@pytest.fixture
def users():  # type: ignore[no-untyped-def]
    hl.require_hub_env()
    made = [hl.UnixUser("nha"), hl.UnixUser("nhb"), hl.UnixUser("nhadm")]
    yield made
    for u in made:
        u.remove()


@pytest.fixture
def hub(tmp_path: Path, users):  # type: ignore[no-untyped-def]
    h = hl.Hub(tmp_path, admins=[users[2].name])
    h.start()
    yield h
    h.close()


def test_login_spawn_run_a_cell_cancel(hub, users, slurm) -> None:  # type: ignore[no-untyped-def]
    import requests

    a, b, adm = users
    # A wrong password is refused, and sets no login cookie.
    anon = requests.Session()
    r = anon.post(hub.url + "/hub/login", data={"user": a.name, "password": "wrong",
                                                "_csrf": hl.login_csrf(anon, hub.url)}, allow_redirects=False)
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert "noyau_hub" not in anon.cookies
    # A login form without its CSRF token is refused even with the right password.
    r = requests.post(hub.url + "/hub/login", data={"user": a.name, "password": a.password, "_csrf": "0" * 64},
                      allow_redirects=False)
    assert r.status_code == 403

    sa = hub.login(a.name, a.password)
    cookie = next(c for c in sa.cookies if c.name == "noyau_hub")
    assert cookie.has_nonstandard_attr("HttpOnly")
    home = sa.get(hub.url + "/hub/home").text
    assert 'id="partitions"' in home and "<td>debug</td>" in home
    csrf = hl.csrf_of(home)
    form = {"_csrf": csrf, "profile": "cpu", "partition": "debug", "cores": 1, "mem_gb": 1, "gpus": 0, "minutes": 10}
    # Limits are enforced by the server, whatever the browser sends.
    r = sa.post(hub.url + "/hub/spawn", data=dict(form, cores=64))
    assert r.status_code == 400 and "cores must be between 1 and 2" in r.text
    r = sa.post(hub.url + "/hub/spawn", data=dict(form, _csrf="bad"))
    assert r.status_code == 403
    assert hl.sessions(sa, hub.url) == []

    r = sa.post(hub.url + "/hub/spawn", data=dict(form, cores=2))
    assert r.status_code == 200, r.text[:500]  # redirected to the home page
    s = hl.wait_state(sa, hub.url, "running")
    assert s["seen"][0] == "queued" and s["node"] and s["job_id"]
    assert s["choice"]["cores"] == 2
    # The job runs as the user, under the hub's job name (no secret in it).
    q = subprocess.run(["squeue", "-h", "-j", s["job_id"], "-o", "%u|%j"], capture_output=True, text=True,
                       check=True).stdout.strip()
    assert q == f"{a.name}|noyau-hub"
    # The form remembers the last choice.
    assert 'id="cores" name="cores" type="number" min="1" max="2" value="2"' in sa.get(hub.url + "/hub/home").text

    # JupyterLab through the hub: its page, then a cell over the kernel WebSocket.
    lab = sa.get(f"{hub.url}/user/{a.name}/lab")
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    assert hl.run_cell(sa, hub.url, a.name, "6 * 7") == "42"
    # The server listens on a unix socket in a 0700 directory, no TCP port.
    assert_no_tcp_listener_of(a.name)

    # User B may not reach A's server, nor cancel A's session.
    sb = hub.login(b.name, b.password)
    for path in (f"/user/{a.name}/lab", f"/user/{a.name}/api/status"):
        assert sb.get(hub.url + path, allow_redirects=False).status_code == 403
    r = sb.post(f"{hub.url}/hub/sessions/{s['id']}/cancel", data={"_csrf": hl.csrf_of(sb.get(hub.url + "/hub/home").text)})
    assert r.status_code == 403
    assert sb.get(hub.url + "/hub/admin").status_code == 403
    assert sb.get(hub.url + "/hub/api/sessions?all=true").status_code == 403
    # Paths that try to name another target are refused.
    for path in ("proxy/22/", "proxy/127.0.0.1:22/", "%2e%2e/" + b.name + "/api/status", "http://127.0.0.1:22/"):
        r = sa.get(f"{hub.url}/user/{a.name}/{path}", allow_redirects=False)
        assert r.status_code == 400, (path, r.status_code)

    # Cancel: the card ends, saying why.
    r = sa.post(f"{hub.url}/hub/sessions/{s['id']}/cancel", data={"_csrf": csrf})
    assert r.status_code == 200
    ended = hl.wait_state(sa, hub.url, "ended", timeout=60)
    assert ended["ended_why"] == "cancelled"
    assert sa.get(f"{hub.url}/user/{a.name}/api/status").status_code == 503

    # Relaunch: a new session with the same settings; an admin sees it and
    # cancels it, but may not enter A's server either.
    r = sa.post(f"{hub.url}/hub/sessions/{s['id']}/relaunch", data={"_csrf": csrf})
    assert r.status_code == 200
    again = hl.sessions(sa, hub.url)[0]
    assert again["id"] != s["id"] and again["choice"] == s["choice"] and again["state"] != "ended"
    sadm = hub.login(adm.name, adm.password)
    admin_page = sadm.get(hub.url + "/hub/admin").text
    assert f"card-{again['id']}" in admin_page and f"card-{s['id']}" in admin_page
    assert {x["user"] for x in sadm.get(hub.url + "/hub/api/sessions?all=true").json()["sessions"]} == {a.name}
    r = sadm.post(f"{hub.url}/hub/sessions/{again['id']}/cancel",
                  data={"_csrf": hl.csrf_of(admin_page)}, headers={"Referer": hub.url + "/hub/admin"})
    assert r.status_code == 200 and r.url.endswith("/hub/admin")
    ended = hl.wait_state(sa, hub.url, "ended", timeout=60)
    assert ended["ended_why"] == f"cancelled by the administrator {adm.name}"
    assert sadm.get(f"{hub.url}/user/{a.name}/api/status").status_code == 403


def test_a_failed_job_says_why_with_its_log(hub, users, slurm) -> None:  # type: ignore[no-untyped-def]
    a = users[0]
    sa = hub.login(a.name, a.password)
    csrf = hl.csrf_of(sa.get(hub.url + "/hub/home").text)
    sa.post(hub.url + "/hub/spawn", data={"_csrf": csrf, "profile": "broken", "partition": "debug", "cores": 1,
                                          "mem_gb": 1, "gpus": 0, "minutes": 5})
    ended = hl.wait_state(sa, hub.url, "ended", timeout=60)
    assert "failed" in ended["ended_why"], ended
    card = sa.get(hub.url + "/hub/cards").text
    assert "cannot start `jupyter lab`" in card  # the job log's tail, on the card
    # The hub reads the log as root from a path the user controls: a log
    # replaced by a link to a file the user may not read shows nothing.
    log = Path(ended["log_path"])
    log.unlink()
    log.symlink_to("/etc/shadow")
    card = sa.get(hub.url + "/hub/cards").text
    assert "root:" not in card and "Ended:" in card


def assert_no_tcp_listener_of(user: str) -> None:
    """No process of `user` listens on TCP (ss shows listeners with owners)."""
    out = subprocess.run(["ss", "-Htlnpe"], capture_output=True, text=True, check=True).stdout
    uid = subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout.strip()
    mine = [l for l in out.splitlines() if f"uid:{uid} " in l]
    assert not mine, f"{user} listens on TCP: {mine}"


def test_sessions_survive_a_hub_restart(hub, users, slurm) -> None:  # type: ignore[no-untyped-def]
    a = users[0]
    sa = hub.login(a.name, a.password)
    csrf = hl.csrf_of(sa.get(hub.url + "/hub/home").text)
    sa.post(hub.url + "/hub/spawn", data={"_csrf": csrf, "profile": "cpu", "partition": "batch", "cores": 1,
                                          "mem_gb": 1, "gpus": 0, "minutes": 10})
    before = hl.wait_state(sa, hub.url, "running")
    assert hl.run_cell(sa, hub.url, a.name, "x = 5; x + 1") == "6"

    hub.kill()
    hub.start()
    # Same login (the cookie is in the database), same session, and the agent
    # dials the new hub process with its token.
    after = hl.sessions(sa, hub.url)[0]
    assert after["id"] == before["id"] and after["job_id"] == before["job_id"]
    assert after["state"] in ("starting", "running")
    hl.wait_state(sa, hub.url, "running", timeout=60)
    assert hl.run_cell(sa, hub.url, a.name, "7 * 6") == "42"
    sa.post(f"{hub.url}/hub/sessions/{before['id']}/cancel", data={"_csrf": csrf})
    hl.wait_state(sa, hub.url, "ended", timeout=60)


def test_one_squeue_per_interval_for_fifty_users(tmp_path: Path, slurm) -> None:  # type: ignore[no-untyped-def]
    """50 simulated users' sessions (rows of the hub's database, each with a
    real held job) are followed by one squeue call per interval."""
    hl.require_hub_env()
    calls = tmp_path / "squeue-calls"
    wrapper = tmp_path / "squeue-counting"
    wrapper.write_text(f"#!/bin/sh\necho call >> {calls}\nexec squeue \"$@\"\n")
    wrapper.chmod(0o755)
    hub = hl.Hub(tmp_path, admins=["root"], poll=0.5, squeue=str(wrapper))
    jobs = []
    try:
        hub.start()
        for _ in range(50):
            jobs.append(subprocess.run(["sbatch", "--parsable", "--hold", "-J", "noyau-test-held", "-o", "/dev/null",
                                        "-t", "5", "--wrap", "true"], capture_output=True, text=True,
                                       check=True).stdout.strip())
        hub.simulate_sessions(jobs, partition="debug", mem_gb=1)

        def all_held() -> bool:
            reasons = hub.simulated_reasons()
            return len(reasons) == 50 and all(r == "JobHeldUser" for r in reasons)

        lib.wait_until(all_held, 30, "the 50 sessions to show Slurm's reason", interval=0.2)
        start_calls = len(calls.read_text().splitlines())
        t0 = time.monotonic()
        lib.wait_until(lambda: time.monotonic() - t0 > 5, 10, "5 s to pass", interval=0.1)
        n = len(calls.read_text().splitlines()) - start_calls
        elapsed = time.monotonic() - t0
        # One call per 0.5 s interval (±20 % jitter), not one per session.
        assert elapsed / (0.5 * 1.2) - 2 <= n <= elapsed / (0.5 * 0.8) + 2, (n, elapsed)
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], check=False)
        hub.close()


def test_a_session_at_its_walltime_ends_saying_so(hub, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """A one-minute session: Slurm ends it at its walltime (about 90 s with
    the kill wait), and the card says why."""
    a = users[0]
    sa = hub.login(a.name, a.password)
    csrf = hl.csrf_of(sa.get(hub.url + "/hub/home").text)
    sa.post(hub.url + "/hub/spawn", data={"_csrf": csrf, "profile": "cpu", "partition": "debug", "cores": 1,
                                          "mem_gb": 1, "gpus": 0, "minutes": 1})
    running = hl.wait_state(sa, hub.url, "running")
    assert hl.secs_of(running["time_left"]) <= 60
    ended = hl.wait_state(sa, hub.url, "ended", timeout=240)
    assert ended["ended_why"] == "reached its walltime", ended


def test_trusted_header_mode(tmp_path: Path, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """Behind an SSO proxy: the user comes from X-Remote-User; forms still
    need their CSRF token, which is bound to the user. A name that is no
    account of this host is refused (test_security.py has root and system
    accounts)."""
    import requests

    alice, bob = users[0].name, users[1].name
    hub = hl.Hub(tmp_path, admins=[], auth="header")
    try:
        hub.start()
        assert requests.get(hub.url + "/hub/home").status_code == 401
        assert requests.get(hub.url + "/hub/home", headers={"X-Remote-User": "../root"}).status_code == 401
        r = requests.get(hub.url + "/hub/home", headers={"X-Remote-User": "nosuchaccount"})
        assert r.status_code == 403 and "no account nosuchaccount" in r.text
        home = requests.get(hub.url + "/hub/home", headers={"X-Remote-User": alice})
        assert home.status_code == 200 and f'<b id="who">{alice}</b>' in home.text
        csrf = hl.csrf_of(home.text)
        form = {"profile": "cpu", "partition": "debug", "cores": 99, "mem_gb": 1, "gpus": 0, "minutes": 5}
        # Bob cannot use Alice's token; Alice's (over-limit) form gets past CSRF to the limits.
        r = requests.post(hub.url + "/hub/spawn", data=dict(form, _csrf=csrf), headers={"X-Remote-User": bob})
        assert r.status_code == 403
        r = requests.post(hub.url + "/hub/spawn", data=dict(form, _csrf=csrf), headers={"X-Remote-User": alice})
        assert r.status_code == 400 and "cores must be between" in r.text
        assert requests.get(f"{hub.url}/user/{bob}/lab", headers={"X-Remote-User": alice}).status_code == 403
        # There is no password login in this mode.
        assert requests.post(hub.url + "/hub/login", data={"user": alice, "password": "x", "_csrf": "0"}).status_code == 404
    finally:
        hub.close()


def test_free_gpus_per_partition_fake_gpu_devices(tmp_path: Path, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """The form shows the GPUs free per partition, not what is configured:
    the test cluster declares two GPUs whose device files are fakes
    (scripts/slurm-up: no GPU here); a job holding one leaves 1 free of 2."""
    import re

    import requests

    hl.require_hub_env()
    hub = hl.Hub(tmp_path, admins=[], auth="header", poll=0.5)
    job = None
    try:
        hub.start()

        def gpus_cell() -> str | None:
            home = requests.get(hub.url + "/hub/home", headers={"X-Remote-User": users[0].name}, timeout=10).text
            m = re.search(r'<tr><td>debug</td>.*?<td class="gpus">([^<]*)</td>', home)
            return m.group(1) if m else None

        assert lib.wait_until(lambda: gpus_cell() == "2 free of 2", 30, "the page to show 2 free GPUs", interval=0.5)
        job = subprocess.run(["sbatch", "--parsable", "-p", "debug", "--gres=gpu:1", "-J", "noyau-test-gpu",
                              "-o", "/dev/null", "-t", "5", "--wrap", "sleep 300"],
                             capture_output=True, text=True, check=True).stdout.strip()
        lib.wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                              text=True).stdout.strip() == "RUNNING", 30, "the GPU job to run")
        # The hub asks sinfo at most once per interval (at least 5 s).
        lib.wait_until(lambda: gpus_cell() == "1 free of 2", 30, "the page to show 1 free GPU of 2", interval=0.5)
    finally:
        if job:
            subprocess.run(["scancel", job], check=False)
            # The slurm fixture checks that no job is left: wait out COMPLETING.
            lib.wait_until(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                                  text=True).stdout.strip() in ("", "CANCELLED"),
                           60, f"job {job} to leave the queue", interval=0.5)
        hub.close()
