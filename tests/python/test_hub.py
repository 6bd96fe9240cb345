"""`noyau hub` end to end: real PAM logins of Unix users made by the test,
real Slurm jobs submitted as those users, real JupyterLab (from PyPI) on a
unix socket in the job, reached through the hub's /user/NAME/ proxy.

The browser-driven version of the first test is test_hub_browser.py.
"""

from __future__ import annotations

import ast
import os
import pwd
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
    assert 'id="partitions"' in home and "<td>debug</td>" in home and "<td>batch</td>" in home
    # The test cluster's `urgent` partition is offered by no profile: not in the table.
    assert "<td>urgent</td>" not in home
    assert 'class="spawn-fields" disabled' not in home
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
    # While the session is live, the start form is disabled.
    assert 'class="spawn-fields" disabled' in r.text and '<p class="busy-note">' in r.text
    # Every card line from submission to Running says only what is known.
    lines = hl.card_lines_until(sa, hub.url, "running")
    assert any(line.startswith("Queued: ") for line in lines) and lines[-1].startswith("Running on "), lines
    assert not [line for line in lines if "?" in line or "1 cores" in line], lines
    # Running says where: an agent that connects before the hub's listing
    # has seen its job start leaves the card as it was until that listing.
    assert not [line for line in lines if line.startswith("Running") and not line.startswith("Running on ")], lines
    s = hl.wait_state(sa, hub.url, "running")
    assert s["node"] and s["job_id"]
    assert s["choice"]["cores"] == 2
    # The job runs as the user, under the hub's job name (no secret in it).
    q = subprocess.run(["squeue", "-h", "-j", s["job_id"], "-o", "%u|%j"], capture_output=True, text=True,
                       check=True).stdout.strip()
    assert q == f"{a.name}|noyau-hub"
    # The job's log is its user's alone: its directory is made 0700 and
    # checked as the user (a `mkdir -p` under the hub's umask left it 0755,
    # the log 0644), so another user reads nothing of it.
    log = Path(s["log_path"])
    st = log.parent.stat()
    assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid) == ("0o700", pwd.getpwnam(a.name).pw_uid), log
    assert log.stat().st_uid == st.st_uid
    r = subprocess.run(["runuser", "-u", b.name, "--", "cat", str(log)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, (r.returncode, r.stderr)
    # The form remembers the last choice.
    assert 'id="cores-cpu" name="cores" type="number" min="1" max="2" value="2"' in sa.get(hub.url + "/hub/home").text

    # JupyterLab through the hub: its page, then a cell over the kernel WebSocket.
    lab = sa.get(f"{hub.url}/user/{a.name}/lab")
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    assert hl.run_cell(sa, hub.url, a.name, "6 * 7") == "42"
    # The server listens on a unix socket in a 0700 directory, its kernels on
    # ipc sockets beside it: while a kernel runs, the user has no TCP port
    # (on tcp, any user of the node could read the kernel's IOPub).
    def kernel_on_ipc(where: str) -> None:
        transport, beside, mode, pipe = ast.literal_eval(where)
        assert (transport, beside, mode) == ("ipc", True, "0o700"), where
        assert_no_tcp_listener_of(a.name, but=pipe)

    hl.run_cell(sa, hub.url, a.name, KERNEL_SOCKETS, while_running=kernel_on_ipc)
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
    # Slurm wrote its own notice of the cancel in the job's log; the card's
    # log tail leaves it out (the card says "cancelled"), and keeps the rest.
    assert "CANCELLED AT" in Path(ended["log_path"]).read_text()
    card = lib.wait_until(lambda: (c := sa.get(hub.url + "/hub/cards").text) and 'class="log"' in c and c, 10,
                          "the log tail on the ended card", interval=0.2)
    assert "Ended: cancelled" in card and "CANCELLED" not in card, card
    assert 'class="spawn-fields" disabled' not in sa.get(hub.url + "/hub/home").text

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


# Run in a hub session's kernel: its transport, whether its ipc sockets are
# beside its connection file, the mode of the server's runtime directory (the
# parent of JUPYTER_RUNTIME_DIR), and the port of ipykernel's IOPub pipe: a
# PULL socket on 127.0.0.1 (hard-coded by ipykernel, iostream.py) by which
# forked children send output. It gives nothing to read, and takes only
# messages that start with its random 16-byte key.
KERNEL_SOCKETS = """
import json, os, stat
from ipykernel.connect import get_connection_file
_c = get_connection_file()
_i = json.load(open(_c))
_d = os.path.dirname(_c)
(_i["transport"], os.path.dirname(_i["ip"]) == _d, oct(stat.S_IMODE(os.stat(os.path.dirname(_d)).st_mode)),
 get_ipython().kernel.iopub_thread._pipe_port)
"""


def assert_no_tcp_listener_of(user: str, but: int | None = None) -> None:
    """No process of `user` listens on TCP (ss shows listeners with owners),
    but on 127.0.0.1:`but` if given."""
    out = subprocess.run(["ss", "-Htlnpe"], capture_output=True, text=True, check=True).stdout
    uid = subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout.strip()
    mine = [l for l in out.splitlines() if f"uid:{uid} " in l and f" 127.0.0.1:{but} " not in l]
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
        assert requests.get(hub.url + "/hub/home", headers=hub.as_user("../root")).status_code == 401
        r = requests.get(hub.url + "/hub/home", headers=hub.as_user("nosuchaccount"))
        assert r.status_code == 403 and "no account nosuchaccount" in r.text
        home = requests.get(hub.url + "/hub/home", headers=hub.as_user(alice))
        assert home.status_code == 200 and f'<b id="who">{alice}</b>' in home.text
        csrf = hl.csrf_of(home.text)
        form = {"profile": "cpu", "partition": "debug", "cores": 99, "mem_gb": 1, "gpus": 0, "minutes": 5}
        # Bob cannot use Alice's token; Alice's (over-limit) form gets past CSRF to the limits.
        r = requests.post(hub.url + "/hub/spawn", data=dict(form, _csrf=csrf), headers=hub.as_user(bob))
        assert r.status_code == 403
        r = requests.post(hub.url + "/hub/spawn", data=dict(form, _csrf=csrf), headers=hub.as_user(alice))
        assert r.status_code == 400 and "cores must be between" in r.text
        assert requests.get(f"{hub.url}/user/{bob}/lab", headers=hub.as_user(alice)).status_code == 403
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
            home = requests.get(hub.url + "/hub/home", headers=hub.as_user(users[0].name), timeout=10).text
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


def test_ended_sessions_fold_into_a_short_history_and_the_audit_cli(hub, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """A user's ended sessions: the three newest under the live ones, the
    older folded (a closed <details>). `noyau hub audit` prints the audit
    table (logins, failed logins, refusals), by user and from a time; the hub
    logs the same events at info."""
    import re

    import requests

    a, b = users[0], users[1]
    for i in range(6):
        hub.add_ended_session(f"old{i}", a.name, "/nonexistent.log", ago=100 + 60 * i, why=f"the job failed ({i})")
    anon = requests.Session()
    anon.post(hub.url + "/hub/login", data={"user": a.name, "password": "wrong", "_csrf": hl.login_csrf(anon, hub.url)})
    sa = hub.login(a.name, a.password)
    sb = hub.login(b.name, b.password)
    assert sb.get(f"{hub.url}/user/{a.name}/lab").status_code == 403

    cards = sa.get(hub.url + "/hub/cards").text
    shown, folded = cards.split('<details class="older" id="older">')
    assert [f"old{i}" for i in range(3)] == re.findall(r'id="card-(old\d)"', shown), shown
    assert [f"old{i}" for i in range(3, 6)] == re.findall(r'id="card-(old\d)"', folded), folded
    assert "<summary>3 older sessions</summary>" in folded
    assert "Ended: the job failed (0)" in hl.card_lines(cards)
    assert sa.get(hub.url + "/hub/home").text.count('class="spawn-fields" disabled') == 0

    rows = hub.audit()
    events = [(r[1], r[2]) for r in rows]
    for e in ((a.name, "login-failed"), (a.name, "login"), (b.name, "login"), (b.name, "forbidden")):
        assert e in events, (e, rows)
    assert events.index((a.name, "login-failed")) < events.index((a.name, "login"))
    mine = hub.audit("--user", a.name)
    assert mine and {r[1] for r in mine} == {a.name}
    assert len(hub.audit("--since", "1h")) == len(rows)
    assert hub.audit("--since", "2099-01-01") == []
    bad = subprocess.run([str(hub.noyau), "hub", "--config", str(hub.config), "audit", "--since", "yesterday"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "how long ago (90m, 12h, 7d)" in bad.stderr, bad.stderr
    # The same events in the hub's log, at info level.
    log = re.sub(r"\x1b\[[0-9;]*m", "", hub.log.read_text())
    assert re.search(rf'INFO .*audit.*user="?{b.name}"? action="?forbidden"?', log), log[-2000:]


def test_the_sites_name_logo_and_message_from_hub_toml(tmp_path: Path, users) -> None:  # type: ignore[no-untyped-def]
    """site_name, logo and motd from hub.toml on the pages (escaped: a motd
    with markup shows as text), the hub's own stylesheet and script served
    by it; a logo that is not a plain image file stops the hub at start."""
    import html
    import re

    import requests

    logo = tmp_path / "logo.svg"
    logo.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40"><circle cx="20" cy="20" r="18" fill="#2b8a57"/></svg>')
    site = f'site_name = "Centre <Test> de calcul"\nlogo = "{logo}"\nmotd = "Maintenance <b>Tuesday</b>.\\n\\nSecond paragraph."\n'
    hub = hl.Hub(tmp_path / "hub", admins=[], extra=site)
    try:
        hub.start()
        login = requests.get(hub.url + "/hub/login").text
        # Escaped: the markup is text.
        assert "<Test>" not in login and "<b>" not in login
        title = re.search(r"<title>(.*?)</title>", login).group(1)
        assert html.unescape(title) == "Log in · Centre <Test> de calcul"
        assert '<img src="/hub/logo" alt="">' in login
        motd = re.search(r'<section class="notice" id="motd"[^>]*>\s*(.*?)\s*</section>', login, re.S).group(1)
        assert re.findall(r"<p>(.*?)</p>", motd) == ["Maintenance &#60;b&#62;Tuesday&#60;/b&#62;.", "Second paragraph."], motd
        r = requests.get(hub.url + "/hub/logo")
        assert r.headers["Content-Type"] == "image/svg+xml" and r.content == logo.read_bytes()
        css_url = re.search(r'<link rel="stylesheet" href="([^"]+)">', login).group(1)
        css = requests.get(hub.url + css_url)
        assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css") and ".card" in css.text
        home = hub.login(users[0].name, users[0].password).get(hub.url + "/hub/home")
        assert "default-src 'none'" in home.headers["Content-Security-Policy"]
        js_url = re.search(r'<script src="([^"]+)" defer></script>', home.text).group(1)
        assert "/hub/cards" in requests.get(hub.url + js_url).text
        assert "<script>" not in home.text  # no inline script: the policy allows none
        hub.kill()
        link = tmp_path / "link.svg"
        link.symlink_to(logo)
        hub.config.write_text(hub.config.read_text().replace(f'logo = "{logo}"', f'logo = "{link}"'))
        out = hub.start_refused()
        assert "logo" in out and "symlink" in out, out
    finally:
        hub.close()


def test_an_idle_session_is_ended_but_never_while_a_kernel_is_busy(tmp_path: Path, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """idle_timeout = 20: a cell that sleeps 35 s keeps its kernel busy, and
    the session goes on; once JupyterLab has had no activity for 20 s the
    hub ends the session, its card saying why, and audits it."""
    a = users[0]
    hub = hl.Hub(tmp_path, admins=[], extra="idle_timeout = 20")
    try:
        hub.start()
        sa, _ = hub.spawn(a)
        hl.wait_state(sa, hub.url, "running")
        # 35 s without a message from the kernel, but it is busy all along.
        assert hl.run_cell(sa, hub.url, a.name, "import time; time.sleep(35); 6 * 7", timeout=90) == "42"
        quiet = time.monotonic()  # run_cell's last request (deleting the kernel) was the last activity
        assert hl.sessions(sa, hub.url)[0]["state"] == "running"
        ended = hl.wait_state(sa, hub.url, "ended", timeout=90)
        idle = time.monotonic() - quiet
        assert idle >= 19, f"ended after {idle:.1f} s without activity; idle_timeout is 20"
        assert ended["ended_why"].startswith("idle: no activity in JupyterLab for 20 s"), ended
        assert f"Ended: {ended['ended_why']}" in hl.card_lines(sa.get(hub.url + "/hub/cards").text)
        assert [r for r in hub.audit("--user", a.name) if r[2] == "culled"]
    finally:
        hub.close()


def test_the_first_example_of_docs_hub_md_runs(tmp_path: Path, users, slurm) -> None:  # type: ignore[no-untyped-def]
    """docs/hub.md's one-machine example, read from the file: its hub.toml
    (only the ports, the state directory, Jupyter's path and the PAM
    service's name changed, for a test beside others) and its PAM service
    file; a user logs in, a session runs, a cell runs in it."""
    import re

    docs = (Path(__file__).resolve().parents[2] / "docs" / "hub.md").read_text()
    first = docs.split("## For a real site")[0]
    toml = re.search(r"```toml\n(.*?)```", first, re.S).group(1)
    pam = re.search(r"/etc/pam.d/noyau-hub`.*?```\n(.*?)```", first, re.S).group(1)
    service = f"noyau-hub-test-{os.urandom(3).hex()}"
    hub = hl.Hub(tmp_path, admins=[])
    toml = (toml.replace('"127.0.0.1:8000"', f'"127.0.0.1:{hub.port}"')
            .replace('"127.0.0.1:8001"', f'"127.0.0.1:{hub.link_port}"')
            .replace('"/var/lib/noyau-hub"', f'"{hub.state}"')
            .replace("/opt/jupyter/bin", f"{hl.JUPYTER_VENV}/bin")
            .replace('"noyau-hub"', f'"{service}"'))
    assert toml.count(str(hub.port)) == 1 and str(hub.state) in toml and service in toml, toml
    hub.config.write_text(toml)
    Path("/etc/pam.d", service).write_text(pam)
    a = users[0]
    try:
        hub.start()
        sa, csrf = hub.spawn(a, mem_gb=0)
        st = hl.wait_state(sa, hub.url, "running")
        assert hl.run_cell(sa, hub.url, a.name, "6 * 7") == "42"
        sa.post(f"{hub.url}/hub/sessions/{st['id']}/cancel", data={"_csrf": csrf})
        hl.wait_state(sa, hub.url, "ended", timeout=60)
    finally:
        hub.close()
        Path("/etc/pam.d", service).unlink(missing_ok=True)


def test_the_hub_on_a_unix_socket(tmp_path: Path, users) -> None:  # type: ignore[no-untyped-def]
    """listen = "unix:PATH" (no TCP port a local user could take while the
    hub restarts): a PAM login through curl --unix-socket, as nginx's
    proxy_pass to it would; killed, the hub's next run replaces the socket
    it left; under socket activation, the hub serves the socket systemd
    passed, and refuses one every local user can connect to."""
    import grp

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o755)
    sock = run / "web.sock"
    # A web server with TLS in front (nginx's proxy_pass to the socket):
    # Secure cookies, which the hub requires on a unix socket.
    hub = hl.Hub(tmp_path / "hub", admins=[], behind_tls=True)
    group = grp.getgrgid(os.getegid()).gr_name
    tcp_toml = hub.config.read_text()

    def listen_on(path: Path, more: str = "") -> None:
        hub.config.write_text(tcp_toml.replace(f'listen = "127.0.0.1:{hub.port}"', f'listen = "unix:{path}"\n{more}'))

    # The browser's cookies, kept by hand: curl keeps Secure cookies off
    # plain HTTP, and here the web server's plain hop is the test's.
    cookies: dict[str, str] = {}
    headers = tmp_path / "headers"

    def curl(path: Path, url: str, *args: str, browser: bool = True) -> tuple[int, str]:
        """A request as the web server forwards it: `X-Forwarded-Proto:
        https` and, from the `browser`, its cookies; the cookies it sets
        are kept."""
        headers.unlink(missing_ok=True)
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items()) if browser else ""
        r = subprocess.run(["curl", "-sS", "--unix-socket", str(path), "-D", str(headers), "-w", "\n%{http_code}",
                            "-H", "X-Forwarded-Proto: https", *(["-H", f"Cookie: {cookie}"] if cookie else []),
                            *args, f"http://hub{url}"], capture_output=True, text=True, timeout=30)
        for line in headers.read_text().splitlines() if browser and headers.exists() else []:
            if line.lower().startswith("set-cookie:"):
                name, _, value = line.split(":", 1)[1].strip().split(";")[0].partition("=")
                cookies[name] = value
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    def start(path: Path, *wrapper: str) -> subprocess.Popen:
        with open(hub.log, "ab") as log:
            p = subprocess.Popen([*wrapper, str(hub.noyau), "hub", "--config", str(hub.config)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=hub.dir,
                                 env=dict(os.environ, NOYAU_LOG="info"))

        def answers() -> bool:
            assert p.poll() is None, f"the hub exited: {hub.log.read_text()[-2000:]}"
            return path.exists() and curl(path, "/hub/login", browser=False)[0] == 200
        lib.wait_until(answers, 30, f"the hub to answer on {path}", interval=0.1)
        return p

    def stop(p: subprocess.Popen) -> None:
        p.kill()
        p.wait(10)

    listen_on(sock, f'listen_group = "{group}"')
    p = start(sock)
    try:
        st = sock.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        code, page = curl(sock, "/hub/login")
        csrf = hl.csrf_of(page)
        u = users[0]
        code, _ = curl(sock, "/hub/login", "--data-urlencode", f"user={u.name}",
                       "--data-urlencode", f"password={u.password}", "--data-urlencode", f"_csrf={csrf}")
        assert code == 303, hub.log.read_text()[-2000:]
        assert "__Host-noyau_hub" in cookies, cookies
        code, home = curl(sock, "/hub/home")
        assert code == 200 and u.name in home, home[:500]
        stop(p)
        assert sock.exists(), "SIGKILL leaves the socket"
        p = start(sock)
        assert curl(sock, "/hub/home")[0] == 200
        stop(p)

        # Socket activation: systemd (here systemd-socket-activate) holds the
        # socket; the hub takes it instead of making its own.
        passed = run / "passed.sock"
        listen_on(passed)
        p = start(passed, "systemd-socket-activate", "-l", str(passed))
        assert "the socket systemd passed" in hub.log.read_text()
        stop(p)
        passed.unlink()
        # systemd's default SocketMode=0666: every local user could connect.
        # (systemd-socket-activate makes it 0644, and starts the hub at the
        # first connection.)
        p = subprocess.Popen(["systemd-socket-activate", "-l", str(passed), str(hub.noyau), "hub", "--config",
                              str(hub.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lib.wait_until(passed.exists, 30, "systemd-socket-activate's socket")
        passed.chmod(0o666)
        assert curl(passed, "/hub/login")[0] != 200
        out, _ = p.communicate(timeout=30)
        assert p.returncode != 0 and "every local user can connect (mode 0666)" in out, out
        passed.unlink()
        # Two sockets: the hub serves one, and a second (not taken, so not
        # made close-on-exec) would be inherited by the commands it runs as
        # users.
        listen_on(passed)
        other = run / "other.sock"
        p = subprocess.Popen(["systemd-socket-activate", "-l", str(passed), "-l", str(other), str(hub.noyau),
                              "hub", "--config", str(hub.config)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        lib.wait_until(passed.exists, 30, "systemd-socket-activate's socket")
        passed.chmod(0o660)
        assert curl(passed, "/hub/login")[0] != 200
        out, _ = p.communicate(timeout=30)
        assert p.returncode != 0 and "systemd passed the hub 2 sockets" in out, out
        # Cookies without Secure where the web server's users reach the hub: refused.
        listen_on(sock, "cookie_secure = false")
        out = hub.start_refused()
        assert "cookie_secure = false" in out and "unix socket" in out and "X-Forwarded-Proto: https" in out, out
    finally:
        if p.poll() is None:
            stop(p)
        hub.close()
