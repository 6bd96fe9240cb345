"""Helpers for the hub's end-to-end tests: Unix users made for the test, a
`noyau hub` process with its own hub.toml and state, a logged-in HTTP
client, and a kernel round trip through JupyterLab's REST and WebSocket
APIs.

The jobs run as the test users, so what they execute must be readable by
them: the noyau binary is copied into a 0755 directory, and Jupyter comes
from a venv outside /root (NOYAU_HUB_JUPYTER_VENV, made by scripts/test:
/opt/noyau-test/hub-venv).
"""

from __future__ import annotations

import html as html_module
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import noyau_testlib as lib

JUPYTER_VENV = Path(os.environ.get("NOYAU_HUB_JUPYTER_VENV", "/opt/noyau-test/hub-venv"))


def require_hub_env() -> None:
    lib.require_slurm()
    if os.geteuid() != 0:
        lib.missing("the hub tests make Unix users and submit jobs as them: run as root")
    if not (JUPYTER_VENV / "bin" / "jupyter-lab").exists():
        lib.missing(f"no JupyterLab for the test users in {JUPYTER_VENV} (scripts/test makes it)",
                    strict=bool(os.environ.get("NOYAU_TEST_SLURM")))


def require_hub_sge_env() -> None:
    """The hub tests' needs, with the Grid Engine test cluster instead of Slurm."""
    lib.require_sge()
    if os.geteuid() != 0:
        lib.missing("the hub tests make Unix users and submit jobs as them: run as root")
    if not (JUPYTER_VENV / "bin" / "jupyter-lab").exists():
        lib.missing(f"no JupyterLab for the test users in {JUPYTER_VENV} (scripts/test makes it)",
                    strict=bool(os.environ.get("NOYAU_TEST_SGE")))


def require_hub_oar_env() -> None:
    """The hub tests' needs, with the OAR test cluster instead of Slurm."""
    lib.require_noyau()
    if os.geteuid() != 0:
        lib.missing("the hub tests make Unix users and submit jobs as them: run as root")
    strict = bool(os.environ.get("NOYAU_TEST_OAR"))
    for ok, msg in ((lib.oar_up(), "no OAR test cluster (run as root: eval \"$(scripts/oar-up DIR)\")"),
                    ((JUPYTER_VENV / "bin" / "jupyter-lab").exists(),
                     f"no JupyterLab for the test users in {JUPYTER_VENV} (scripts/test makes it)")):
        if not ok:
            lib.missing(msg, strict=strict)


class UnixUser:
    """A real account with a password, removed at the end; `system`: a
    system account (useradd -r: a uid below 1000), `groups`: supplementary
    groups it is in."""

    def __init__(self, prefix: str, system: bool = False, groups: list[str] | None = None) -> None:
        self.name = f"{prefix}{uuid.uuid4().hex[:6]}"
        self.password = "pw-" + secrets.token_hex(8)
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", *(["-r"] if system else []),
                        *(["-G", ",".join(groups)] if groups else []), self.name], check=True)
        subprocess.run(["chpasswd"], input=f"{self.name}:{self.password}", text=True, check=True)

    def remove(self) -> None:
        uid = subprocess.run(["id", "-u", self.name], capture_output=True, text=True).stdout.strip()
        subprocess.run(["scancel", "-u", self.name], check=False, capture_output=True)
        subprocess.run(["pkill", "-KILL", "-u", self.name], check=False)
        subprocess.run(["userdel", "-r", "-f", self.name], check=False, capture_output=True)
        if uid:
            # The uid is reused by the next test user: leave it no runtime dir.
            shutil.rmtree(f"/tmp/noyau-{uid}", ignore_errors=True)


PROXY_SECRET_HEADER = "X-Proxy-Secret"


class Hub:
    """One `noyau hub` with its own configuration and state directory."""

    def __init__(self, workdir: Path, admins: list[str], poll: float = 1.0, squeue: str = "squeue",
                 auth: str = "pam", scheduler: str = "slurm", submit_as: list[str] | None = None,
                 oarstat: str = "oarstat", run_as: str | None = None, listen_host: str = "127.0.0.1",
                 extra: str = "", proxy_secret: bool = True, behind_tls: bool = False) -> None:
        """`extra`: more top-level hub.toml lines (the test's own keys);
        `proxy_secret`: header mode gets the SSO proxy's secret header (a
        hub without one refuses to start); `behind_tls`: the hub is set up
        as behind a web server with TLS (Secure cookies, hub.toml's
        default: the hub refuses `cookie_secure = false` with
        proxy_addresses or a unix-socket listen); the test then plays that
        web server with `behind_tls()` sessions."""
        self.run_as = run_as
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.bin_dir = Path(tempfile.mkdtemp(prefix="noyau-hub-bin-"))
        self.bin_dir.chmod(0o755)
        noyau = self.bin_dir / "noyau"
        shutil.copy2(lib.noyau_bin(), noyau)
        noyau.chmod(0o755)
        self.noyau = noyau
        self.port, self.link_port = lib.free_port(), lib.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = self.dir / "state"
        self.log = self.dir / "hub.log"
        self.config = self.dir / "hub.toml"
        path = f"{JUPYTER_VENV}/bin:/usr/local/bin:/usr/bin:/bin"
        # Header mode always needs the SSO proxy's secret (loopback too):
        # the test plays the proxy, sending it with the user header.
        self.proxy_secret = ""
        if auth == "header" and proxy_secret and "auth_secret_header" not in extra:
            self.proxy_secret = secrets.token_hex(32)
            secret_file = self.dir / "proxy-secret"
            secret_file.write_text(self.proxy_secret)
            secret_file.chmod(0o600)
            extra = f'auth_secret_header = "{PROXY_SECRET_HEADER}"\nauth_secret_file = "{secret_file}"\n{extra}'
        # OAR and Grid Engine: queues instead of partitions, and no memory request.
        queues, mem = {"slurm": (["debug", "batch"], "mem_gb = {{ min = 1, max = {}, default = 1 }}"),
                       "oar": (["default", "batch"], ""),
                       "sge": (["all.q", "batch"], "")}[scheduler]
        self.config.write_text(f"""
listen = "{listen_host}:{self.port}"
link_bind = "127.0.0.1:{self.link_port}"
link_advertise = "127.0.0.1:{self.link_port}"
state_dir = "{self.state}"
auth = "{auth}"
admins = {json.dumps(admins)}
poll_interval = {poll}
{"" if behind_tls else "cookie_secure = false"}
agent = "{noyau}"
scheduler = "{scheduler}"
{f"submit_as = {json.dumps(submit_as)}" if submit_as else ""}
{extra}

[slurm]
squeue = "{squeue}"

[oar]
oarstat = "{oarstat}"

[profiles.cpu]
label = "CPU session"
partitions = {json.dumps(queues)}
cores = {{ min = 1, max = 2, default = 1 }}
{mem.format(2)}
minutes = {{ min = 1, max = 30, default = 10 }}
env = {{ PATH = "{path}", NOYAU_LOG = "info" }}

[profiles.broken]
label = "A profile whose Jupyter is missing"
partitions = {json.dumps(queues[:1])}
cores = {{ min = 1, max = 1, default = 1 }}
{mem.format(1)}
minutes = {{ min = 1, max = 5, default = 5 }}
env = {{ PATH = "/nonexistent:/usr/bin:/bin" }}
""")
        self.proc: subprocess.Popen | None = None

    def as_user(self, user: str) -> dict[str, str]:
        """The headers the SSO proxy sends for `user` (header mode)."""
        return {"X-Remote-User": user, PROXY_SECRET_HEADER: self.proxy_secret}

    def start(self) -> None:
        env = dict(os.environ, NOYAU_LOG="info")
        with open(self.log, "ab") as log:
            # run_as: a non-root hub (the sudo form of submit_as), started
            # directly as that account so that kill() reaches it.
            who = {} if self.run_as is None else {"user": self.run_as, "group": self.run_as, "extra_groups": []}
            self.proc = subprocess.Popen([str(self.noyau), "hub", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir, **who)
        lib.wait_until(self._answers, 30, f"the hub to answer (log: {self.log})", interval=0.1)

    def start_refused(self, timeout: float = 30) -> str:
        """Starts the hub expecting it to refuse to start: returns what it
        printed; fails if it is still running after `timeout` s."""
        r = subprocess.Popen([str(self.noyau), "hub", "--config", str(self.config)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=self.dir)
        try:
            out, _ = r.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            r.kill()
            out, _ = r.communicate()
            raise AssertionError(f"the hub started instead of refusing to: {out}") from None
        assert r.returncode != 0, f"the hub exited with 0: {out}"
        return out

    def _answers(self) -> bool:
        import requests

        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"the hub exited with {self.proc.returncode}: {self.log.read_text()}")
        try:
            return requests.get(self.url + "/hub/login", timeout=2).status_code < 500
        except requests.ConnectionError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.bin_dir, ignore_errors=True)

    def login(self, user: str, password: str):  # type: ignore[no-untyped-def]
        """A requests.Session logged in as `user`, or AssertionError."""
        import requests

        s = requests.Session()
        r = s.post(self.url + "/hub/login", data={"user": user, "password": password,
                                                   "_csrf": login_csrf(s, self.url)},
                   allow_redirects=False, timeout=30)
        assert r.status_code == 303, f"login as {user} answered {r.status_code}: {r.text[:300]}"
        return s


    def spawn(self, user: UnixUser, partition: str = "debug", mem_gb: int = 1, minutes: int = 10):  # type: ignore[no-untyped-def]
        """Logs `user` in and starts a session of profile `cpu` with one core:
        the logged-in requests.Session and the forms' CSRF token."""
        s = self.login(user.name, user.password)
        csrf = csrf_of(s.get(self.url + "/hub/home").text)
        r = s.post(self.url + "/hub/spawn", data={"_csrf": csrf, "profile": "cpu", "partition": partition,
                                                  "cores": 1, "mem_gb": mem_gb, "gpus": 0, "minutes": minutes})
        assert r.status_code == 200, r.text[:500]
        return s, csrf

    def simulate_sessions(self, jobs: list[str], partition: str, mem_gb: int) -> None:
        """Simulated users' queued sessions, one per (real, held) job, written
        into the hub's database as the spawn form would have made them."""
        import sqlite3

        choice = json.dumps({"profile": "cpu", "partition": partition, "cores": 1, "mem_gb": mem_gb,
                             "gpus": 0, "minutes": 5}, separators=(",", ":"))
        db = sqlite3.connect(self.state / "hub.sqlite")
        with db:
            for i, job in enumerate(jobs):
                db.execute("INSERT INTO sessions (id, user, choice, job_id, state, created) "
                           "VALUES (?, ?, ?, ?, 'queued', ?)",
                           (f"sim{i:02d}", f"simulated-user-{i:02d}", choice, job, int(time.time()) - 10))
        db.close()

    def add_ended_session(self, sid: str, user: str, log_path: str, ago: int = 10,
                          why: str = "the job failed") -> None:
        """An ended session of `user` whose job log is at `log_path`, made
        `ago` seconds ago, written into the hub's database as the watcher
        leaves one."""
        import sqlite3

        choice = json.dumps({"profile": "cpu", "partition": "debug", "cores": 1, "mem_gb": 1, "gpus": 0,
                             "minutes": 5}, separators=(",", ":"))
        db = sqlite3.connect(self.state / "hub.sqlite")
        with db:
            db.execute("INSERT INTO sessions (id, user, choice, job_id, state, ended_why, log_path, created) "
                       "VALUES (?, ?, ?, '1', 'ended', ?, ?, ?)",
                       (sid, user, choice, why, log_path, int(time.time()) - ago))
        db.close()

    def audit(self, *args: str) -> list[list[str]]:
        """`noyau hub audit ARGS` of this hub: its rows (time, user, action,
        detail), the header checked."""
        out = subprocess.run([str(self.noyau), "hub", "--config", str(self.config), "audit", *args],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert out and out[0].split() == ["TIME", "USER", "ACTION", "DETAIL"], out
        return [[line[:19], *line[21:].split(None, 2)] for line in out[1:]]

    def simulated_reasons(self) -> list[str]:
        """The queue reason the hub's watcher recorded for each simulated session."""
        import sqlite3

        db = sqlite3.connect(self.state / "hub.sqlite")
        rows = db.execute("SELECT reason FROM sessions WHERE id LIKE 'sim%'").fetchall()
        db.close()
        return [r[0] or "" for r in rows]


class _CookiesOverTheProxysHop(http.cookiejar.DefaultCookiePolicy):
    """Secure cookies sent over plain HTTP: the hop from a TLS web server
    to the hub, where the browser's cookies (sent over HTTPS) go on."""

    def return_ok_secure(self, cookie, request) -> bool:  # type: ignore[no-untyped-def]
        return True


def behind_tls():  # type: ignore[no-untyped-def]
    """A requests.Session as the site's TLS web server forwards a
    browser's requests to a `Hub(behind_tls=True)`: saying
    `X-Forwarded-Proto: https`, and carrying the browser's Secure
    cookies on the plain-HTTP hop (requests, as browsers, keeps them off
    plain HTTP: each request's cookies are picked again under the hop's
    policy)."""
    import requests

    class Session(requests.Session):
        def prepare_request(self, request):  # type: ignore[no-untyped-def]
            prepared = super().prepare_request(request)
            jar = requests.cookies.RequestsCookieJar(policy=_CookiesOverTheProxysHop())
            jar.update(self.cookies)
            prepared.headers.pop("Cookie", None)
            prepared.prepare_cookies(jar)
            return prepared

    s = Session()
    s.headers["X-Forwarded-Proto"] = "https"
    return s


def login_csrf(s, url: str) -> str:  # type: ignore[no-untyped-def]
    return csrf_of(s.get(url + "/hub/login", timeout=10).text)


def csrf_of(html: str) -> str:
    m = re.search(r'name="_csrf" value="([0-9a-f]+)"', html)
    assert m, f"no CSRF token in the page: {html[:300]}"
    return m.group(1)


def sessions(s, url: str) -> list[dict]:  # type: ignore[no-untyped-def]
    r = s.get(url + "/hub/api/sessions", timeout=10)
    r.raise_for_status()
    return r.json()["sessions"]


def wait_state(s, url: str, state: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    """Polls the user's newest session until it is in `state`; "running"
    with its time left: the agent's connection makes a session running at
    once, its time left comes with the hub's next listing of the scheduler
    (a poll interval later at most)."""
    seen: list[str] = []

    def check():  # type: ignore[no-untyped-def]
        cur = sessions(s, url)[0]
        if not seen or seen[-1] != cur["state"]:
            seen.append(cur["state"])
        if cur["state"] == "ended" and state != "ended":
            raise AssertionError(f"the session ended: {cur}")
        if state == "running" and cur["state"] == state and not cur["time_left"]:
            return None
        return cur if cur["state"] == state else None

    got = lib.wait_until(check, timeout, f"the session to be {state} (seen {seen})", interval=0.3)
    got["seen"] = seen
    return got


def card_lines(html: str) -> list[str]:
    """The lead line of each card in a page (`<p class="state">`)."""
    return [html_module.unescape(m) for m in re.findall(r'<p class="state">([^<]*)</p>', html)]


def card_lines_until(s, url: str, state: str, timeout: float = 120) -> list[str]:  # type: ignore[no-untyped-def]
    """Every distinct lead line the user's newest card showed (/hub/cards,
    asked every 0.1 s) until its session is in `state`."""
    seen: list[str] = []

    def check() -> bool:
        html = s.get(url + "/hub/cards", timeout=10).text
        first = re.search(r'data-state="(\w+)"', html)
        lines = card_lines(html)
        if lines and (not seen or seen[-1] != lines[0]):
            seen.append(lines[0])
        return bool(first and first.group(1) == state)

    lib.wait_until(check, timeout, f"the card to be {state} (seen {seen})", interval=0.1)
    return seen


def secs_of(slurm_time: str) -> int:
    """Seconds in Slurm's D-HH:MM:SS / HH:MM:SS / MM:SS."""
    days, _, rest = slurm_time.rpartition("-")
    secs = 0
    for part in rest.split(":"):
        secs = secs * 60 + int(part)
    return secs + int(days or 0) * 86400


def spawn_refused_then_running(s, url: str, csrf: str, queue: str, mem_gb: int = 0) -> dict:  # type: ignore[no-untyped-def]
    """Asks for more cores than the profile allows (refused, saying the
    limits), then for one core in `queue`; returns the session once running."""
    form = {"_csrf": csrf, "profile": "cpu", "partition": queue, "cores": 1, "mem_gb": mem_gb, "gpus": 0,
            "minutes": 10}
    r = s.post(url + "/hub/spawn", data=dict(form, cores=64))
    assert r.status_code == 400 and "cores must be between 1 and 2" in r.text, r.text[:500]
    r = s.post(url + "/hub/spawn", data=form)
    assert r.status_code == 200, r.text[:500]
    return wait_state(s, url, "running", timeout=180)


def cancel_until_ended(s, url: str, csrf: str, session: dict) -> dict:  # type: ignore[no-untyped-def]
    """Cancels the session from its card; returns it once ended as cancelled."""
    r = s.post(f"{url}/hub/sessions/{session['id']}/cancel", data={"_csrf": csrf})
    assert r.status_code == 200
    ended = wait_state(s, url, "ended", timeout=90)
    assert ended["ended_why"] == "cancelled", ended
    return ended


def run_cell(s, url: str, user: str, code: str, timeout: float = 60,  # type: ignore[no-untyped-def]
             while_running: Callable[[str], None] | None = None) -> str:
    """Starts a kernel in the user's JupyterLab through the hub, runs `code`
    over the kernel WebSocket, returns the text of its result; deletes the
    kernel, after calling `while_running` (if given) with that text while it
    still runs."""
    import websocket

    base = f"{url}/user/{user}"
    s.get(f"{base}/lab", timeout=30).raise_for_status()  # sets _xsrf
    xsrf = s.cookies.get("_xsrf", "")
    r = s.post(f"{base}/api/kernels", json={"name": "python3"}, headers={"X-XSRFToken": xsrf}, timeout=60)
    assert r.status_code == 201, f"starting a kernel through the hub: {r.status_code} {r.text[:300]}"
    kid = r.json()["id"]
    cookie = "; ".join(f"{k}={v}" for k, v in s.cookies.items())
    ws = websocket.create_connection(f"ws://{url.removeprefix('http://')}/user/{user}/api/kernels/{kid}/channels",
                                     cookie=cookie, timeout=timeout, origin=url,
                                     # the trusted-header mode's user, as the SSO proxy would set it
                                     header=[f"{k}: {v}" for k, v in s.headers.items()
                                             if k.lower() in ("x-remote-user", PROXY_SECRET_HEADER.lower())])
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": user, "session": uuid.uuid4().hex,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            m = json.loads(ws.recv())
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "execute_result":
                result = m["content"]["data"]["text/plain"]
            if m["msg_type"] == "error":
                raise AssertionError(f"the cell failed: {m['content']}")
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" and result is not None:
                if while_running is not None:
                    while_running(result)
                return result
        raise AssertionError("no result from the kernel in time")
    finally:
        ws.close()
        s.delete(f"{base}/api/kernels/{kid}", headers={"X-XSRFToken": xsrf}, timeout=30)
