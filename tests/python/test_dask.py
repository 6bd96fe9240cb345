"""`%noyau dask up|status|down`: a Dask cluster whose scheduler and workers are
Slurm jobs (the real test cluster of scripts/slurm-up, the real `distributed`
from PyPI), owned by a noyau notebook kernel and secured with Dask's TLS."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import urllib.request
from pathlib import Path

import pytest

import noyau_testlib as lib
from noyau_testlib import require_slurm

PROFILE = """\
[profiles.hpc]
backend = "slurm"
partition = "debug"
time = "10"
mem = "500M"
"""


def dask_jobs() -> list[dict[str, str]]:
    return [j for j in lib.squeue_noyau() if j["name"].startswith("noyau-dask-")]


def dask_processes() -> list[str]:
    """Dask processes of this session's clusters still alive (their command
    lines name a cluster directory under this session's state directory)."""
    state = os.environ["XDG_STATE_HOME"]
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(a.decode(errors="replace") for a in argv)
        if "distributed.cli.dask_" in line and f"{state}/noyau/dask/" in line:
            found.append(f"{p.name}: {line[:120]}")
    return found


def end_cluster_jobs(timeout: float = 30) -> None:
    """Waits for the cluster's jobs to leave the queue and their Dask
    processes to end; cleans up and fails on leftovers."""
    try:
        lib.wait_until(lambda: not dask_jobs(), timeout, "the cluster's jobs to leave the queue", interval=0.5)
    except Exception:
        pass
    left = dask_jobs()
    if left:
        subprocess.run(["scancel", *[j["id"] for j in left]], check=False)
    assert not left, f"Dask jobs left in the queue: {left}"
    # a cancelled job takes its Dask with it (the test cluster tracks a
    # job's processes by parentage, so an orphaned worker would live on)
    try:
        lib.wait_until(lambda: not dask_processes(), 30, "the cluster's Dask processes to end", interval=0.5)
    except Exception:
        pass
    orphans = dask_processes()
    for o in orphans:
        os.kill(int(o.split(":")[0]), signal.SIGKILL)
    assert not orphans, f"Dask processes outlived their jobs: {orphans}"


def need_dask_on_slurm(cpus: int, what: str) -> None:
    require_slurm()
    if importlib.util.find_spec("distributed") is None:
        lib.missing("distributed is not installed (tests/python/requirements.txt pins it)")
    if lib.slurm_node_cpus() < cpus:
        lib.missing(f"the test cluster has fewer than {cpus} CPUs for {what}: "
                    "start it with SLURM_UP_CPUS=4 scripts/slurm-up DIR")


@pytest.fixture
def kernel(noyau_kernelspec: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Starts a noyau kernel in tmp_path (with the `hpc` Slurm profile) with
    extra environment variables; ends it and checks no Dask job is left."""
    need_dask_on_slurm(3, "scheduler + 2 workers")
    (tmp_path / "noyau.toml").write_text(PROFILE)
    started = []

    def start(env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        m = lib.kernel_in(noyau_kernelspec, tmp_path, env)
        started.append(m)
        return m

    yield start
    for m in started:
        try:
            lib.stop_kernel(m)
        except Exception:
            pass
    end_cluster_jobs()


@pytest.fixture
def km(kernel):  # type: ignore[no-untyped-def]
    return kernel()


def run(km, code: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    out: list[dict] = []
    reply = km.kc.execute_interactive(code, timeout=timeout, output_hook=out.append)
    text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    errors = [m["content"] for m in out if m["msg_type"] == "error"]
    return reply["content"], text, errors


def test_dask_up_compute_status_down_and_shutdown(km) -> None:  # type: ignore[no-untyped-def]
    reply, text, errors = run(km, "%noyau dask up 2 --target hpc", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    m = re.search(r"Client\(\"(tls://[^\"]+)\"\)", text)
    assert m, text
    address = m.group(1)
    # the dashboard, through the port noyau forwards on this host
    if importlib.util.find_spec("bokeh") is None:
        lib.missing("bokeh is not installed (tests/python/requirements.txt pins it)")
    d = re.search(r"^dashboard: (http://127\.0\.0\.1:\d+/status\?token=[0-9a-f]+)$", text, re.M)
    assert d, text
    dashboard = d.group(1)

    def dashboard_page() -> str:
        with urllib.request.urlopen(dashboard, timeout=30) as r:
            assert r.status == 200, r.status
            return r.read().decode()

    # The scheduler loads its dashboard after it starts listening (bokeh's
    # import would delay every worker): until then a request waits, then
    # gets a page that reloads itself.
    page = dashboard_page()
    if "bokeh" not in page.lower():
        assert 'http-equiv="refresh"' in page, page[:500]
        lib.wait_until(lambda: "bokeh" in dashboard_page().lower(), 60, "the Dask dashboard to load", interval=0.5)
        page = dashboard_page()
    assert "Dask" in page and "bokeh" in page.lower(), page[:500]
    jobs = dask_jobs()
    assert sorted(j["name"] for j in jobs) == ["noyau-dask-scheduler", "noyau-dask-worker", "noyau-dask-worker"], jobs
    assert len(dask_processes()) == 3, dask_processes()  # what the teardown checks is gone

    # a bare Client() finds the cluster, with TLS, and computes
    reply, text, errors = run(km, (
        "import os\n"
        "from dask.distributed import Client\n"
        "client = Client()\n"
        "client.wait_for_workers(2, timeout=120)\n"
        "futs = client.map(lambda x: x * x, range(100))\n"
        "print(client.scheduler.address, os.environ['DASK_SCHEDULER_ADDRESS'])\n"
        "print(sum(client.gather(futs)))\n"
        "print(sorted(client.run(lambda dask_worker: dask_worker.nanny is None).values()))\n"
        "import dask.array as da\n"
        "from dask.distributed import wait\n"
        "y = (da.ones((1000, 1000), chunks=(100, 100)) * 2).persist()\n"
        "wait(y)\n"
        "print(len({w for ws in client.who_has(y).values() for w in ws}), int(y.sum().compute()))\n"
    ), timeout=180)
    assert reply["status"] == "ok", (text, errors)
    lines = text.splitlines()
    assert lines[0] == f"{address} {address}", text
    assert lines[1] == str(sum(x * x for x in range(100))), text
    # by default the batch job is the worker's only keeper (no Dask nanny)
    assert lines[2] == "[True, True]", text
    # a dask.array computation, its chunks held by both workers
    assert lines[3] == "2 2000000", text

    def status() -> str:
        reply, text, _ = run(km, "%noyau dask status")
        assert reply["status"] == "ok"
        return text

    # the scheduler lists its workers once a second; the jobs' states come
    # from the job watcher's next squeue, which may follow the workers
    lib.wait_until(lambda: "workers: 2" in status(), 10, "dask status to list 2 workers", interval=0.5)
    lib.wait_until(lambda: status().count("running on") == 3, 30,
                   "dask status to show the 3 jobs running", interval=0.5)
    text = status()
    assert f"scheduler: {address}" in text, text
    assert f"dashboard: {dashboard}" in text, text
    assert "workers: 2" in text, text
    assert text.count("running on") == 3, text

    # a client without the cluster's certificate cannot connect
    probe = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "from distributed import Client\n"
        "from distributed.security import Security\n"
        f"addr = {address!r}\n"
        "for sec in (None, Security(require_encryption=True)):\n"
        "    try:\n"
        "        Client(addr, security=sec, timeout=5)\n"
        "    except Exception as e:\n"
        "        print('refused', type(e).__name__)\n"
        "    else:\n"
        "        print('CONNECTED')\n"
    )], capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("DASK_")})
    assert probe.stdout.count("refused") == 2 and "CONNECTED" not in probe.stdout, (probe.stdout, probe.stderr)

    reply, text, _ = run(km, "client.close()\n")
    reply, text, _ = run(km, "%noyau dask down")
    assert reply["status"] == "ok" and "cancelled its 3 jobs" in text, text
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to leave the queue", interval=0.5)

    # shutdown ends a cluster that was left up; --nanny puts the worker
    # under Dask's nanny, which Client.restart() needs
    reply, text, errors = run(km, "%noyau dask up 1 --target hpc --nanny", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    assert len(dask_jobs()) == 2
    reply, text, errors = run(km, (
        "client = Client()\n"
        "client.wait_for_workers(1, timeout=120)\n"
        "print(list(client.run(lambda dask_worker: dask_worker.nanny is not None).values()))\n"
        "client.restart()\n"
        "print(client.submit(lambda: 6 * 7).result())\n"
    ), timeout=180)
    assert reply["status"] == "ok", (text, errors)
    assert text.splitlines() == ["[True]", "42"], text
    km.shutdown_kernel()
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to leave the queue after shutdown", interval=0.5)


# Another user's `distributed` package: it notes who imported it, then hands
# over to the real one (as an attacker's would, so that nothing looks wrong).
PLANTED_DISTRIBUTED = """\
import os, sys
with open({marker!r}, "a") as f:
    f.write(f"{{os.getuid()}} {{os.getpid()}} {{sys.argv}}\\n")
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules["distributed"]
import distributed
"""

PLANT = """\
import os, sys
scratch, code = sys.argv[1], sys.argv[2]
os.mkdir(scratch)
os.chmod(scratch, 0o777)
os.mkdir(os.path.join(scratch, "distributed"))
with open(os.path.join(scratch, "distributed", "__init__.py"), "w") as f:
    f.write(code)
"""

WHERE_DASK_WORKS = (
    "import json, sys\n"
    "from dask.distributed import Client\n"
    "client = Client()\n"
    "client.wait_for_workers(1, timeout=120)\n"
    "where = lambda dask_worker: [dask_worker.local_directory, sys.path]\n"
    "seen = [client.run_on_scheduler(lambda dask_scheduler: where(dask_scheduler)),\n"
    "        *client.run(where).values()]\n"
    "if NANNY:\n"
    "    seen += client.run(where, nanny=True).values()\n"
    "print(json.dumps(seen))\n"
    "print(client.submit(lambda: 6 * 7).result())\n"
    "client.close()\n"
)


@pytest.fixture
def planted_scratch(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Dask's default scratch directory ($TMPDIR/dask-scratch-space), made
    first by another user (noyau-test), open to all, with a `distributed`
    package that writes `marker` when imported. A directory already there
    (this user's, from earlier Dask runs) is put aside meanwhile."""
    if os.geteuid() != 0:
        lib.missing("planting a directory as another local user (runuser -u noyau-test) needs root")
    scratch = Path(tempfile.gettempdir()) / "dask-scratch-space"
    aside = scratch.with_name(f"dask-scratch-space.aside-{uuid.uuid4().hex[:8]}")
    if scratch.exists():
        scratch.rename(aside)
    marker = tmp_path / "planted-distributed-ran"
    code = PLANTED_DISTRIBUTED.format(marker=str(marker))
    try:
        r = subprocess.run(["runuser", "-u", "noyau-test", "--", "/usr/bin/python3", "-c", PLANT, str(scratch), code],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert scratch.stat().st_uid != 0 and scratch.stat().st_mode & 0o777 == 0o777
        # the plant works: a Python with that directory first on its path
        # (where Dask puts its scratch directory) runs it, and goes on
        probe = subprocess.run([sys.executable, "-c", "import distributed; print(distributed.Client.__name__)"],
                               env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True, text=True,
                               timeout=120)
        assert probe.stdout.strip() == "Client" and marker.exists(), (probe.stdout, probe.stderr)
        marker.unlink()
        yield scratch, marker
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if aside.exists():
            if scratch.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.rename(scratch)


def test_dask_never_uses_a_scratch_directory_another_user_made(km, planted_scratch) -> None:  # type: ignore[no-untyped-def]
    """Dask puts its scratch directory first on `sys.path` and spills pickled
    data into it; by default that is $TMPDIR/dask-scratch-space, whoever made
    it. With another user's there (open to all, holding a `distributed`
    package), a cluster with the nanny and one without still compute, no
    Dask process imports the plant or has it on its path, and Dask's files
    are in a private directory of the job's, removed when it ends."""
    scratch, marker = planted_scratch
    private_base = Path(os.environ["XDG_RUNTIME_DIR"]) / "noyau"
    for nanny in (True, False):
        up = "%noyau dask up 1 --target hpc" + (" --nanny" if nanny else "")
        reply, text, errors = run(km, up, timeout=180)
        assert reply["status"] == "ok", (text, errors)
        reply, text, errors = run(km, f"NANNY = {nanny}\n" + WHERE_DASK_WORKS, timeout=180)
        assert reply["status"] == "ok", (text, errors)
        seen_text, answer = text.splitlines()[-2:]
        assert answer == "42", text
        assert not marker.exists(), (nanny, marker.read_text())
        seen = json.loads(seen_text)
        assert len(seen) == (3 if nanny else 2), seen
        for local_dir, path in seen:
            assert [p for p in path if p.startswith(str(scratch))] == [], (nanny, path)
            # $XDG_RUNTIME_DIR/noyau/dask-PID-RAND/dask-scratch-space[/worker-…]
            rel = Path(local_dir).relative_to(private_base)
            assert rel.parts[0].startswith("dask-") and rel.parts[1] == "dask-scratch-space", local_dir
            private = private_base / rel.parts[0]
            st = private.lstat()
            assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700, (private, oct(st.st_mode))
        reply, text, _ = run(km, "%noyau dask down")
        assert reply["status"] == "ok", text
        end_cluster_jobs()
        lib.wait_until(lambda: not list(private_base.glob("dask-*")), 30,
                       "the cluster's jobs to remove their private Dask directories", interval=0.2)
    # nothing of the user's went into the other user's directory
    assert [p.name for p in scratch.iterdir()] == ["distributed"], list(scratch.iterdir())


NOBODY_GET = """\
import json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
try:
    r = urllib.request.urlopen(req, timeout=30)
    print(json.dumps([r.status, r.headers.get("Set-Cookie", "")]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, ""]))
"""


def test_the_dashboard_answers_only_its_token_whoever_asks(km, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every user of the kernel's host reaches its 127.0.0.1: the dashboard
    noyau relays there answers the link with its token (and the cookie that
    link sets), and 403 otherwise, before anything reaches Dask. Asked as
    another local user (nobody, through runuser). Behind it, the scheduler's
    and the worker's own HTTP ports serve no stranger."""
    if importlib.util.find_spec("bokeh") is None:
        lib.missing("bokeh is not installed (tests/python/requirements.txt pins it)")
    if os.geteuid() != 0:
        lib.missing("asking as another local user (runuser -u nobody) needs root")
    reply, text, errors = run(km, "%noyau dask up 1 --target hpc", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    m = re.search(r"^dashboard: (http://127\.0\.0\.1:(\d+)/status\?token=([0-9a-f]+))$", text, re.M)
    assert m, text
    link, port, token = m.group(1), m.group(2), m.group(3)
    base = f"http://127.0.0.1:{port}"

    def as_nobody(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        r = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", NOBODY_GET, url,
                            json.dumps(headers or {})], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        status, cookie = json.loads(r.stdout)
        return status, cookie

    assert as_nobody(f"{base}/status")[0] == 403
    assert as_nobody(f"{base}/status?token={'0' * len(token)}")[0] == 403
    assert as_nobody(f"{base}/status", {"Cookie": f"noyau-dask-{port}={token[:-1]}"})[0] == 403
    status, cookie = as_nobody(link)
    assert status == 200, status
    assert cookie.startswith(f"noyau-dask-{port}={token};") and "HttpOnly" in cookie, cookie
    # the page's own requests carry the cookie
    assert as_nobody(f"{base}/status", {"Cookie": cookie.split(";")[0]})[0] == 200
    # a websocket too (the dashboard's live plots use them), through the relay
    assert http_status("127.0.0.1", int(port), "/eventstream", {"Cookie": cookie.split(";")[0]},
                       websocket=True) == 101
    reply, text, _ = run(km, "%noyau dask status")
    assert f"dashboard: {link}\n" in text, text
    reply, out, errors = run(km, (
        "import json, os\n"
        "from dask.distributed import Client\n"
        "with Client() as c:\n"
        "    c.wait_for_workers(1, timeout=120)\n"
        "    info = c.scheduler_info()\n"
        "    print(c.scheduler.address, info['services']['dashboard'])\n"
        "print(json.dumps({a: w['services'] for a, w in info['workers'].items()}))\n"
        "print(os.path.dirname(os.environ['DASK_DISTRIBUTED__COMM__TLS__CA_FILE']))\n"
    ), timeout=120)
    assert reply["status"] == "ok", (out, errors)
    first, workers, cluster_dir = out.splitlines()[:3]
    address, port_text = first.split()
    upstream_refuses_who_lacks_the_clusters_certificate(address, int(port_text), Path(cluster_dir), tmp_path,
                                                         status=text)
    [services] = json.loads(workers).values()
    a_workers_http_server_serves_nothing(services["dashboard"])


def http_status(host: str, port: int, path: str, headers: dict[str, str], websocket: bool = False,
                tls: ssl.SSLContext | None = None) -> int:
    """The status code of a GET to host:port (with TLS when `tls`); 0 if the
    server closed or broke the connection without answering."""
    connection = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} if websocket else {"Connection": "close"}
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **connection, **headers}.items())
    try:
        with (socket.create_connection((host, port), timeout=30) as raw,
              tls.wrap_socket(raw, server_hostname="noyau-dask") if tls else raw as s):
            s.sendall(f"GET {path} HTTP/1.1\r\n{head}\r\n".encode())
            answer = b""
            while b"\r\n" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    return 0
                answer += chunk
    except (ssl.SSLError, ConnectionError):
        return 0
    return int(answer.split(b" ", 2)[1])


def upstream_refuses_who_lacks_the_clusters_certificate(address: str, port: int, cluster_dir: Path,
                                                         tmp_path: Path, status: str) -> None:
    """The scheduler's own HTTP port (open to the network: the relay reaches
    it from the kernel's host) speaks TLS only, with the cluster's
    certificate, and serves only clients showing a certificate of the
    cluster's CA (pages, Dask's /info pages, websockets): plain HTTP, TLS
    without a client certificate, or with one the CA did not sign, get no
    answer. Its address is no longer printed."""
    host = address.removeprefix("tls://").rsplit(":", 1)[0]
    assert json.loads((cluster_dir / "scheduler.json").read_text())["services"]["dashboard"] == port
    ca = str(cluster_dir / "ca.pem")

    def client(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        # checks the server's certificate: the cluster's CA signed it, for its name
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        return context

    def refused(tls: ssl.SSLContext | None) -> None:
        for path in ("/status", "/info/main/logs.html", "/sitemap.json"):
            assert http_status(host, port, path, {}, tls=tls) == 0, (path, tls)
        assert http_status(host, port, "/eventstream", {}, websocket=True, tls=tls) == 0, tls

    refused(None)
    refused(client())
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=noyau-dask", "-addext", "subjectAltName=DNS:noyau-dask",
                    "-keyout", str(stranger / "key.pem"), "-out", str(stranger / "cert.pem")],
                   check=True, capture_output=True)
    refused(client(stranger / "cert.pem", stranger / "key.pem"))
    # The cluster's certificate (the relay's) opens it: the same requests are served.
    right = client(cluster_dir / "cert.pem", cluster_dir / "key.pem")
    assert http_status(host, port, "/info/main/logs.html", {}, tls=right) == 200
    assert http_status(host, port, "/eventstream", {}, websocket=True, tls=right) == 101
    assert f":{port}" not in status and "forwards it to" not in status, status


def a_workers_http_server_serves_nothing(port: int) -> None:
    """Dask starts a worker's HTTP server even without its dashboard: it
    listens on the node's loopback only (the test cluster's node is this
    host), and serves none of Dask's routes (/metrics would show the
    worker's tasks and memory)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                listening.add(host)
    assert listening == {"0100007F"}, listening  # 127.0.0.1 only
    for path in ("/metrics", "/health", "/statics/images/dask-logo.svg"):
        assert http_status("127.0.0.1", port, path, {}) == 404, path


def test_dask_up_needs_distributed_in_the_environment(kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a Python without distributed: a bare venv
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    (tmp_path / "noyau.toml").write_text(PROFILE + f'env = {{ NOYAU_DASK_PYTHON = "{bare}/bin/python" }}\n')
    # A project's `env` names code (here the Dask python): the user trusts this one.
    km = kernel(lib.trusting(tmp_path))
    reply, text, errors = run(km, "%noyau dask up 1 --target hpc", timeout=180)
    assert reply["status"] == "error", text
    assert "no usable `distributed`" in errors[0]["evalue"], errors
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to be cancelled", interval=0.5)


def test_kill_9_of_the_proxy_ends_every_job_after_the_grace(kernel) -> None:  # type: ignore[no-untyped-def]
    km = kernel({"NOYAU_LINK_GIVE_UP": "10", "NOYAU_REATTACH_GRACE": "10"})
    reply, text, errors = run(km, "%noyau dask up 2 --target hpc", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    jobs = dask_jobs()
    assert len(jobs) == 3, jobs
    lib.kill(km.provisioner.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    lib.wait_until(lambda: not dask_jobs(), 60, "the cluster's jobs to leave the queue after the owner died",
                   interval=0.5)
    # they outlived the proxy for the grace period (10 s), not until their walltime
    assert time.monotonic() - killed >= 8, "the cluster ended before the grace period"
    lib.wait_until(lambda: not lib.squeue_noyau(), 60, "the kernel's own job to end after its grace", interval=0.5)


def test_the_kernels_death_ends_every_job(km) -> None:  # type: ignore[no-untyped-def]
    reply, text, errors = run(km, "%noyau dask up 1 --target hpc", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    assert len(dask_jobs()) == 2
    # the notebook's ipykernel dies (not the proxy)
    reply, text, errors = run(km, "import os\nos._exit(1)", timeout=60)
    assert reply["status"] == "error" and "The kernel died" in reply["evalue"], (reply, text)
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to leave the queue after the kernel died",
                   interval=0.5)


def reply_while(km, msg_id: str, observe, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    """The shell reply to `msg_id`, calling `observe()` between polls of
    the shell channel (0.5 s each) until it comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        observe()
        try:
            r = km.kc.get_shell_msg(timeout=0.5)
        except Exception:
            continue
        if r["parent_header"].get("msg_id") == msg_id:
            return r
    raise AssertionError(f"no reply to {msg_id} within {timeout} s")


def worker_jobs() -> set[str]:
    return {j["id"] for j in dask_jobs() if j["name"] == "noyau-dask-worker"}


def direction_changes(counts: list[int]) -> int:
    """How many times a sequence of job counts turns (up then down is 1)."""
    steps = [b - a for a, b in zip(counts, counts[1:]) if b != a]
    return sum(1 for a, b in zip(steps, steps[1:]) if (a > 0) != (b > 0))


def test_adapt_starts_workers_under_load_and_cancels_them_when_idle(km, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the settings come from [dask] in noyau.toml (the same as --adapt 0 2 --target hpc --worker-cores 1)
    (tmp_path / "noyau.toml").write_text(PROFILE + '[dask]\ntarget = "hpc"\nadapt = [0, 2]\nworker_cores = 1\n')
    reply, text, errors = run(km, "%noyau dask up", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    assert "adaptive 0 to 2" in text, text
    assert worker_jobs() == set(), "MIN is 0: no worker before there is work"

    # about 40 s of work for one single-threaded worker: Dask's target asks for 2
    msg_id = km.kc.execute(
        "import time\n"
        "from dask.distributed import Client\n"
        "client = Client()\n"
        "futs = client.map(lambda i: (time.sleep(1), i)[1], range(40), pure=False)\n"
        "total = sum(client.gather(futs))\n"
        "del futs  # results held in the cluster keep a worker (Dask's target stays 1)\n"
        "print(total)\n")
    seen: set[str] = set()
    counts: list[int] = []

    def observe() -> int:
        jobs = worker_jobs()
        seen.update(jobs)
        counts.append(len(jobs))
        return len(jobs)

    reply = reply_while(km, msg_id, observe, 240)
    assert reply["content"]["status"] == "ok", reply
    assert max(counts) == 2, counts
    while (m := km.kc.get_iopub_msg(timeout=10)):
        if m["msg_type"] == "stream":
            assert m["content"]["text"].strip() == str(sum(range(40)))
            break

    # idle: after Dask's target has stayed at 0 for a while, the jobs are retired
    lib.wait_until(lambda: observe() == 0, 120, "the idle workers' jobs to end", interval=0.5)
    assert len(seen) == 2, f"worker jobs started: {sorted(seen)} (counts {counts})"
    assert direction_changes(counts) <= 1, f"the job count oscillated: {counts}"

    reply, text, _ = run(km, "%noyau dask status")
    assert "2 started, 2 ended by scale-down" in text, text
    assert "Dask's target: 0" in text, text


@pytest.mark.timeout(600)
def test_a_computation_longer_than_the_worker_walltime_finishes(km) -> None:  # type: ignore[no-untyped-def]
    # workers of 2 minutes retire gracefully after 90 s; each is replaced ahead of time
    reply, text, errors = run(km, "%noyau dask up 1 --target hpc --worker-cores 1 --worker-time 2", timeout=180)
    assert reply["status"] == "ok", (text, errors)
    assert "workers retire after 90 s" in text, text

    # about 3 minutes of work for one single-threaded worker
    msg_id = km.kc.execute(
        "import time\n"
        "from dask.distributed import Client\n"
        "client = Client()\n"
        "futs = client.map(lambda i: (time.sleep(2), i * i)[1], range(90), pure=False)\n"
        "print(sum(client.gather(futs)))\n")
    running: dict[str, list[float]] = {}  # job id -> [first, last] seen running

    def observe() -> None:
        now = time.monotonic()
        for j in dask_jobs():
            if j["name"] == "noyau-dask-worker" and j["state"] == "RUNNING":
                running.setdefault(j["id"], [now, now])[1] = now

    reply = reply_while(km, msg_id, observe, 420)
    assert reply["content"]["status"] == "ok", reply
    while (m := km.kc.get_iopub_msg(timeout=10)):
        if m["msg_type"] == "stream":
            assert m["content"]["text"].strip() == str(sum(i * i for i in range(90)))
            break
    assert len(running) >= 2, f"no worker was replaced: {running}"
    ids = sorted(running, key=int)
    still = {j["id"] for j in dask_jobs()}
    for i in ids:
        first, last = running[i]
        if i not in still:
            # ended by its own graceful retirement, well before the 120 s walltime
            assert last - first < 110, f"worker job {i} ran {last - first:.0f} s: {running}"
    # each replacement started before the job it replaces ended (no gap)
    for old, new in zip(ids, ids[1:]):
        assert running[new][0] < running[old][1], f"job {new} started after {old} ended: {running}"
    reply, text, _ = run(km, "%noyau dask status")
    assert re.search(r"[1-9]\d* replaced before their walltime", text), text


# ------------------------------------------------- Dask in `noyau run` and sweeps

def dask_notebook(path: Path, workers: int = 2) -> Path:
    """A batch notebook as a centre writes it: a Dask cluster on the
    `hpc` target, then a dask.array computation of size `n` (a parameter)."""
    sources = [
        ("n = 1000", ["parameters"]),
        (f"%noyau dask up {workers} --target hpc", []),
        ("from dask.distributed import Client\nimport dask.array as da\nclient = Client()\n"
         "print(int(da.arange(n, chunks=10).sum().compute()))", []),
    ]
    cells = [{"cell_type": "code", "metadata": {"tags": tags}, "source": s, "outputs": [],
              "execution_count": None, "id": f"c{i}"} for i, (s, tags) in enumerate(sources)]
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))
    return path


def stdout_of(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def displayed(cell: dict) -> str:
    """The text of a cell's displays (a note updated in place is one)."""
    return "".join("".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", [])
                   if o.get("output_type") == "display_data")


@pytest.fixture
def run_dir(tmp_path: Path, noyau_bin: str):  # type: ignore[no-untyped-def]
    """tmp_path with the `hpc` profile, on a cluster with room for a
    kernel's job, a scheduler and 2 workers; no Dask job may be left."""
    need_dask_on_slurm(4, "a run's job, a scheduler and 2 workers")
    (tmp_path / "noyau.toml").write_text(PROFILE)
    yield tmp_path
    end_cluster_jobs()
    lib.wait_until(lambda: not lib.squeue_noyau(), 60, "every job of the run to leave the queue", interval=0.5)


def test_a_run_on_slurm_starts_a_dask_cluster_computes_and_leaves_no_job(run_dir: Path, noyau_bin: str) -> None:
    nb = dask_notebook(run_dir / "batch.ipynb")
    out = run_dir / "out.ipynb"
    r = subprocess.run([noyau_bin, "run", "--no-progress", str(nb), str(out), "--backend", "slurm",
                        "--profile", "hpc", "-p", "n", "100"],
                       cwd=run_dir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cells = json.loads(out.read_text())["cells"]
    assert "scheduler up" in stdout_of(cells[2]), cells[2]
    assert stdout_of(cells[3]) == "4950\n", cells[3]
    # the run cancelled its cluster as it ended (the jobs may still be completing)
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to leave the queue", interval=0.5)


def test_a_detached_run_starts_its_dask_cluster_from_its_job(run_dir: Path, noyau_bin: str) -> None:
    nb = dask_notebook(run_dir / "batch.ipynb")
    out = run_dir / "out.ipynb"
    r = subprocess.run([noyau_bin, "run", "--detach", str(nb), str(out), "--backend", "slurm",
                        "--profile", "hpc", "-p", "n", "100"],
                       cwd=run_dir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout

    def ended() -> bool:
        return job not in {j["id"] for j in lib.squeue_noyau()}
    lib.wait_until(ended, 400, "the detached run's job to end", interval=0.5)
    cells = json.loads(out.read_text())["cells"]
    assert stdout_of(cells[3]) == "4950\n", cells[3]
    # the run cancelled its cluster as it ended (the jobs may still be completing)
    lib.wait_until(lambda: not dask_jobs(), 30, "the cluster's jobs to leave the queue", interval=0.5)


def test_a_run_says_why_its_cluster_waits(run_dir: Path, noyau_bin: str) -> None:
    """While the cluster's jobs wait in the queue, the `dask up` cell of a
    headless run shows why (the scheduler's reason), as a queued kernel's
    note does, and says when they run."""
    nb = dask_notebook(run_dir / "batch.ipynb", workers=1)
    out = run_dir / "out.ipynb"
    blocker = lib.fill_the_node()
    p = subprocess.Popen([noyau_bin, "run", "--no-progress", str(nb), str(out), "-p", "n", "100"],
                         cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def note() -> str:
            try:
                cell = json.loads(out.read_text())["cells"][2]
            except (OSError, ValueError, IndexError):
                return ""
            return displayed(cell)
        # the scheduler's own reason (the first note may still say "submitted")
        why = re.compile(r"noyau: Dask: scheduler queued on slurm job \d+ \(partition debug\): "
                         r"reason (Resources|Priority)")
        lib.wait_until(lambda: why.search(note()), 120, "the dask up cell to say why its jobs wait", interval=0.5)
    finally:
        subprocess.run(["scancel", blocker], check=False)
    assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
    cells = json.loads(out.read_text())["cells"]
    assert stdout_of(cells[3]) == "4950\n", cells[3]
    assert "scheduler up" in stdout_of(cells[2]), cells[2]


def test_a_sweep_runs_dask_in_every_point(run_dir: Path, noyau_bin: str) -> None:
    nb = dask_notebook(run_dir / "batch.ipynb")
    outdir = run_dir / "sweep"
    r = subprocess.run([noyau_bin, "sweep", str(nb), "--grid", "n=10,100,1000", "--max-parallel", "1",
                        "--backend", "slurm", "--profile", "hpc", "-o", str(outdir)],
                       cwd=run_dir, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    summary = json.loads((outdir / "summary.json").read_text())
    got = {p["parameters"]["n"]: stdout_of(json.loads(Path(p["output"]).read_text())["cells"][3])
           for p in summary["points"]}
    assert got == {10: "45\n", 100: "4950\n", 1000: "499500\n"}, got
    # each point cancelled its cluster as it ended (the jobs may still be completing)
    lib.wait_until(lambda: not dask_jobs(), 30, "the clusters' jobs to leave the queue", interval=0.5)


def test_kill_9_of_a_run_ends_its_cluster_after_the_grace(run_dir: Path, noyau_bin: str) -> None:
    nb = dask_notebook(run_dir / "batch.ipynb")
    cells = json.loads(nb.read_text())
    cells["cells"][2]["source"] = "import time\ntime.sleep(600)"
    nb.write_text(json.dumps(cells))
    out = run_dir / "out.ipynb"
    env = {**os.environ, "NOYAU_LINK_GIVE_UP": "10"}
    p = subprocess.Popen([noyau_bin, "run", "--no-progress", str(nb), str(out)], cwd=run_dir, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"the run ended early: {p.stderr.read() if p.stderr else ''}")
            try:
                saved = json.loads(out.read_text())["cells"]
            except (OSError, ValueError):
                return False
            return "scheduler up" in stdout_of(saved[1])
        lib.wait_until(up, 240, "the run's Dask cluster to be up", interval=0.5)
        assert len(dask_jobs()) == 3, dask_jobs()
        p.kill()
        killed = time.monotonic()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    lib.wait_until(lambda: not dask_jobs(), 90, "the cluster's jobs to leave the queue after the run was killed",
                   interval=0.5)
    assert time.monotonic() - killed >= 8, "the cluster ended before the grace period"
