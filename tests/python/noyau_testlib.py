"""Helpers shared by the end-to-end tests and bench/: process discovery through
/proc, polling with a deadline, and driving one kernel with jupyter_client.

Nothing here sleeps to stand in for synchronisation: every wait polls for a
condition and fails with a message when its deadline passes.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

NOYAU_KERNEL_NAME = "noyau-python3"
DIRECT_KERNEL_NAME = "python3"
# Cells on a target (profile `side`) between the notebook kernel's: their
# execution counts must be the notebook's 1..6 (test_run_noyau, test_nbclient).
TARGET_CELLS = [
    "x = 1",
    "%%noyau on side\ny = 2",
    "%%noyau on side\ny + 1",
    "%%noyau on side\nprint(y)",
    "x + 1",
    "%%noyau on side\ny * 10",
]


def tasks_hide_their_body() -> tuple[str, str]:
    """A `--tasks` cell's body, and the line each of its tasks prints if no
    process's command line (on the task's node, looked at while the tasks
    run) holds that body: a cell may hold secrets, which every user of the
    node would see there (and Slurm keeps `srun`'s in its accounting)."""
    mark = f"not-a-secret-{uuid.uuid4().hex}"
    body = ("import glob\nseen = []\nfor f in glob.glob('/proc/[0-9]*/cmdline'):\n"
            f"    try:\n        if b'{mark}' in open(f, 'rb').read():\n            seen.append(f)\n"
            "    except OSError:\n        pass\nprint('the body on command lines:', seen)")
    return body, "the body on command lines: []"


# Every process a test starts inherits NOYAU_TEST_SESSION (set by conftest) and,
# when started through start_kernel(), NOYAU_TEST_TAG: that is how leftovers are
# found even after they have been re-parented to init.
SESSION_VAR = "NOYAU_TEST_SESSION"
TAG_VAR = "NOYAU_TEST_TAG"


# Set by conftest: the error of `noyau install`, if it failed.
noyau_install_error: str | None = None

# jupyter_kernel_test outcomes per variant ("direct"/"noyau"), filled by conftest's
# report hook and checked by test_kernel_suite.py's last test.
SUITE_OUTCOMES: dict[str, dict[str, str]] = {"direct": {}, "noyau": {}, "noyau-comm": {}}


def noyau_bin() -> str | None:
    return os.environ.get("NOYAU_BIN") or None


def under_ci() -> bool:
    """CI=1 (.ci/run) or CI=true: a missing prerequisite is then a failure."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, strict: bool = False) -> NoReturn:
    """A test's prerequisite is missing: the test is skipped, saying what,
    except under CI (or when `strict`), where that fails it. scripts/test
    lists every skip with its reason, and under CI refuses one that
    scripts/test-skips.allowed does not allow."""
    import pytest

    if strict or under_ci():
        pytest.fail(f"{what} (a missing prerequisite fails under CI)", pytrace=False)
    pytest.skip(what)


def require_noyau() -> None:
    """Skip without NOYAU_BIN (fail under CI); fail when NOYAU_BIN is set but the install failed."""
    import pytest

    if not noyau_bin():
        missing("NOYAU_BIN is not set")
    if noyau_install_error:
        pytest.fail(f"noyau install failed: {noyau_install_error}", pytrace=False)


def trusting(project: Path, xdg: Path | None = None) -> dict[str, str]:
    """The variables of a user whose own config file (under `xdg`, by default
    `project/xdg`) trusts `project` and keeps what this session's says (its
    cluster profiles): a project's noyau.toml that names code (a profile's
    `env`, an `[environment]` python) is used only from a trusted
    directory. Merged into the environment of what runs as that user."""
    session = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
    xdg = xdg or project / "xdg"
    own = xdg / "noyau" / "config.toml"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text(f'trusted_projects = ["{project.resolve()}"]\n'
                   + (session.read_text() if session.exists() else ""))
    return {"XDG_CONFIG_HOME": str(xdg)}


# --------------------------------------------------------------------------
# ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_given_ports: set[int] = set()


def held_sbatch(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A `sbatch` wrapper (in the returned bin directory, to put first on
    PATH) that touches `began` when it is called, then waits until the test
    opens the FIFO `gate` before it runs the real sbatch: a submission the
    test holds while it cancels or signals, with no sleep."""
    import shutil

    real = shutil.which("sbatch")
    assert real, "sbatch is not on PATH"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gate, began = tmp_path / "gate", tmp_path / "began"
    os.mkfifo(gate)
    wrapper = bindir / "sbatch"
    wrapper.write_text(f'#!/bin/sh\ntouch {began}\ncat {gate} >/dev/null\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return bindir, gate, began


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process a test starts to listen on.

    Not one bind(0) hands out: that port is free only until the socket closes,
    and the kernel hands it out again, to jupyter_client picking a kernel's
    ports or to any outgoing connection, before the process under test binds
    it (a CI run lost to "Address already in use" that way). Ports below the
    ephemeral range are only ever taken by an explicit bind; this process gives
    each out once. From 20000 up: clear of services' usual ports (Slurm, PostgreSQL).
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(20000 if low > 21000 else 1024, low)
        if port in _given_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    raise RuntimeError(f"no free port found below the ephemeral range (from {low})")


# --------------------------------------------------------------------------
# polling


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy; return it. Fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# /proc


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    raw = _read(pid, "cmdline")
    if not raw:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def environ(pid: int) -> dict[str, str]:
    raw = _read(pid, "environ")
    out: dict[str, str] = {}
    if raw:
        for item in raw.split(b"\0"):
            k, sep, v = item.partition(b"=")
            if sep:
                out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _stat_fields(pid: int) -> list[str] | None:
    raw = _read(pid, "stat")
    if not raw:
        return None
    # the command name is in parentheses and may hold spaces: split after the last ')'
    rest = raw[raw.rfind(b")") + 2 :].decode().split()
    return rest  # rest[0] = state, rest[1] = ppid


def ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    f = _stat_fields(pid)
    return bool(f) and f[0] not in ("Z", "X")


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in pids():
        pp = ppid(p)
        if pp is not None:
            children.setdefault(pp, []).append(p)
    out: set[int] = set()
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def tagged(var: str, value: str) -> set[int]:
    """Live processes whose environment has var=value."""
    me = os.getpid()
    return {p for p in pids() if p != me and alive(p) and environ(p).get(var) == value}


def _noyau_subcommand(pid: int) -> str | None:
    """`agent` for `noyau agent ...`."""
    argv = cmdline(pid)
    if len(argv) > 1 and os.path.basename(argv[0]) == "noyau":
        return argv[1]
    return None


def is_agent(pid: int) -> bool:
    return _noyau_subcommand(pid) == "agent"


def is_proxy(pid: int) -> bool:
    return _noyau_subcommand(pid) == "kernel"


def is_inner_kernel(pid: int) -> bool:
    return any("ipykernel_launcher" in a or a.endswith("ipykernel") for a in cmdline(pid))


def vm_hwm_kib(pid: int) -> int | None:
    raw = _read(pid, "status")
    if not raw:
        return None
    for line in raw.decode().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------
# kernels


class Kernel:
    """One kernel started through jupyter_client, with the processes it owns."""

    def __init__(self, kernel_name: str, stderr: Any = None, env: dict[str, str | None] | None = None,
                 ready_timeout: float = 60, transport: str = "tcp"):
        from jupyter_client.manager import KernelManager

        self.tag = f"{os.environ.get(SESSION_VAR, 'nosession')}-{uuid.uuid4().hex[:12]}"
        kenv = dict(os.environ)
        kenv[TAG_VAR] = self.tag
        for name, value in (env or {}).items():  # None: unset
            if value is None:
                kenv.pop(name, None)
            else:
                kenv[name] = value
        self.km = KernelManager(kernel_name=kernel_name, transport=transport)
        if transport == "ipc":
            # ipc socket paths are "{ip}-{port}": put them in the session's private dir.
            self.km.ip = os.path.join(os.environ.get("JUPYTER_RUNTIME_DIR", "/tmp"), f"k-{self.tag[-12:]}")
        self.km.start_kernel(env=kenv, stderr=stderr)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=ready_timeout)

    # processes -------------------------------------------------------------
    @property
    def launched_pid(self) -> int:
        """The pid jupyter_client launched: the proxy (noyau) or ipykernel (direct)."""
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def processes(self) -> set[int]:
        """Every live process that belongs to this kernel (tag or descendant)."""
        out = tagged(TAG_VAR, self.tag)
        if alive(self.launched_pid):
            out |= {self.launched_pid} | descendants(self.launched_pid)
        return out

    def agents(self) -> set[int]:
        return {p for p in self.processes() if is_agent(p)}

    def inner_kernels(self) -> set[int]:
        return {p for p in self.processes() if is_inner_kernel(p)}

    # messages --------------------------------------------------------------
    def execute(self, code: str, **kw: Any) -> str:
        return self.kc.execute(code, **kw)

    def iopub_for(self, msg_id: str, until: Callable[[dict], bool], timeout: float) -> list[dict]:
        """Collect IOPub messages whose parent is msg_id until `until(msg)` holds."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s; IOPub so far: "
                    f"{[m['msg_type'] for m in got][-20:]}")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            got.append(msg)
            if until(msg):
                return got

    def reply_for(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no shell reply to {msg_id} within {timeout} s")
            try:
                msg = self.kc.get_shell_msg(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def run(self, code: str, timeout: float = 60) -> tuple[dict, list[dict]]:
        """Execute and wait for both the reply and IOPub idle. Returns (reply, iopub)."""
        msg_id = self.execute(code)
        reply = self.reply_for(msg_id, timeout)
        iopub = self.iopub_for(msg_id, is_idle, timeout)
        return reply, iopub

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            try:
                self.km.shutdown_kernel(now=False)
            except Exception:
                self.km.shutdown_kernel(now=True)


def is_idle(msg: dict) -> bool:
    return msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle"


def stream_text(msgs: Iterable[dict], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def message_text(msg: dict) -> str:
    """All human-readable text of an IOPub message (stream, error, display)."""
    c = msg.get("content", {})
    parts = [c.get("text", ""), c.get("ename", ""), c.get("evalue", "")]
    parts += c.get("traceback", []) or []
    data = c.get("data") or {}
    if isinstance(data, dict):
        parts.append(str(data.get("text/plain", "")))
    return "\n".join(str(p) for p in parts)


def read_kernelspec(prefix: Path, name: str) -> dict:
    return json.loads((prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())


# --------------------------------------------------------------------------
# the Slurm test cluster (scripts/slurm-up, started by scripts/test as root)

SLURM_KERNEL_NAME = "noyau-slurm-python3"
SLURM_TEST_CONFIG = """\
scheduler = "slurm"

[profiles.test]
backend = "slurm"
partition = "debug"
time = "10"
mem = "500M"
"""


def slurm_up() -> bool:
    import subprocess

    if not os.environ.get("SLURM_CONF"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_slurm() -> None:
    """Skip without a cluster, except under CI (or with NOYAU_TEST_SLURM=1), where that fails."""
    require_noyau()
    if slurm_up():
        return
    missing("no Slurm test cluster (scripts/test starts one as root; by hand: eval \"$(scripts/slurm-up DIR)\")",
            strict=bool(os.environ.get("NOYAU_TEST_SLURM")))


def squeue_noyau() -> list[dict[str, str]]:
    """This user's noyau jobs still in the queue (pending or running)."""
    import subprocess

    out = subprocess.run(["squeue", "--me", "-h", "-o", "%i|%T|%r|%j"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    jobs = []
    for line in out.splitlines():
        i, st, r, name = line.split("|", 3)
        if name.startswith("noyau-"):
            jobs.append({"id": i, "state": st, "reason": r, "name": name})
    return jobs


def slurm_node_cpus() -> int:
    """The CPUs the test cluster's node declares (may exceed the machine's)."""
    import subprocess

    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    return max(int(x) for x in out.split())


def fill_the_node() -> str:
    """Submits a job holding every CPU of the test node (partition `batch`)
    and waits until it runs; returns its id. The caller scancels it."""
    import subprocess

    blocker = subprocess.run(
        ["sbatch", "--parsable", "-p", "batch", "-J", "noyau-test-blocker", "-c", str(slurm_node_cpus()),
         "--mem", "100M", "-t", "5", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_until(lambda: any(j["id"] == blocker and j["state"] == "RUNNING" for j in squeue_noyau()),
                   30, "the blocker to run")
    except AssertionError:
        subprocess.run(["scancel", blocker], check=False)
        raise
    return blocker


def kernel_in(kernel_name: str, cwd: Path | str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A KernelManager started in `cwd` (where its noyau.toml is), its client
    ready and attached as `.kc`."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(cwd=str(cwd), env={**os.environ, **(env or {})})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    km.kc = kc  # type: ignore[attr-defined]
    return km


def stop_kernel(km) -> None:  # type: ignore[no-untyped-def]
    km.kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel()


# --------------------------------------------------------------------------
# the OAR test cluster (scripts/oar-up, started by scripts/test as root)
#
# OAR runs no job of root's, so noyau runs as the test user of scripts/oar-up
# ($NOYAU_OAR_USER), with a clean environment and a HOME of its own (OAR's
# job resource manager deletes the user's files in /tmp when their last job
# ends, so nothing of theirs lives there). That user gets a venv of its own
# (ipykernel and nbclient at this suite's pins), a python3 kernelspec and a
# copy of the binary, made once per session. Kernels the tests drive with
# jupyter_client (as root) go through the kernelspec `noyau-oar-python3`,
# whose launcher (oar_user_kernel.py) becomes `noyau kernel --backend oar`
# as that user.

OAR_KERNEL_NAME = "noyau-oar-python3"
_REQ = Path(__file__).with_name("requirements.txt")
# what the test user's kernels and drivers import (at requirements.txt's pins)
_OAR_USER_PACKAGES = ("ipykernel", "ipywidgets", "nbclient", "jupyter-client", "nbformat", "distributed")


class OarUser:
    def __init__(self, name: str) -> None:
        import pwd

        self.name = name
        self.home = Path(pwd.getpwnam(name).pw_dir)
        self.venv = self.home / "noyau-test-venv"
        self.bin = self.home / "noyau"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": f"{self.venv}/bin:/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8", "NOYAU_LOG": "info", "NOYAU_OAR_POLL": "0.5"}

    def _argv(self, args: list[str], cwd: Path) -> list[str]:
        # PWD as a shell sets it: oarsub reads its directory from there
        return ["runuser", "-u", self.name, "--", "env", "-i", f"PWD={cwd}",
                *(f"{k}={v}" for k, v in self.env().items()), *args]

    def run(self, args: list[str], cwd: Path, timeout: float = 180,
            check: bool = False):  # type: ignore[no-untyped-def]
        import subprocess

        r = subprocess.run(self._argv(args, cwd), cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def popen(self, args: list[str], cwd: Path):  # type: ignore[no-untyped-def]
        import subprocess

        return subprocess.Popen(self._argv(args, cwd), cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def workdir(self, name: str) -> Path:
        import shutil

        d = self.home / "tests" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.chown(self.home / "tests", self.name, self.name)
        shutil.chown(d, self.name, self.name)
        return d

    def write(self, path: Path, text: str) -> Path:
        import shutil

        path.write_text(text)
        shutil.chown(path, self.name, self.name)
        return path

    def prepare(self) -> None:
        """The user's copy of the binary (the checkout may sit where it cannot
        read), venv, python3 kernelspec and noyau-oar kernelspec."""
        import shutil

        shutil.copy2(noyau_bin(), self.bin)  # type: ignore[arg-type]
        shutil.chown(self.bin, self.name, self.name)
        # made again when the packages or their pins change
        want = " ".join(_OAR_USER_PACKAGES) + "\n" + _REQ.read_text()
        stamp = self.venv / ".noyau-test-packages"
        if not stamp.is_file() or stamp.read_text() != want:
            self.run(["/usr/bin/python3", "-m", "venv", "--clear", str(self.venv)], self.home,
                     check=True)
            req = self.write(self.home / "noyau-test-requirements.txt", _REQ.read_text())
            self.run([f"{self.venv}/bin/pip", "install", "-q", "--disable-pip-version-check",
                      "-c", str(req), *_OAR_USER_PACKAGES], self.home, timeout=600, check=True)
            self.write(stamp, want)
        self.run([f"{self.venv}/bin/python", "-m", "ipykernel", "install", "--user"], self.home,
                 check=True)
        self.run([str(self.bin), "install", "--name", "noyau-oar", "--inner", "python3",
                  "--backend", "oar", "--user"], self.home, check=True)


_oar_user: OarUser | None = None


def daemon_env() -> dict[str, str]:
    """The environment for a daemon a test restarts: without this session's
    markers, which conftest's cleanup kills."""
    return {k: v for k, v in os.environ.items() if k not in (SESSION_VAR, TAG_VAR)}


def oar_up() -> bool:
    import shutil

    return bool(os.environ.get("NOYAU_OAR_USER")) and shutil.which("oarsub") is not None


def require_oar() -> OarUser:
    """The prepared test user; skips without a cluster, except under CI (or
    with NOYAU_TEST_OAR=1), where that fails."""
    global _oar_user
    require_noyau()
    if not oar_up():
        missing("no OAR test cluster (scripts/test starts one as root; by hand: eval \"$(scripts/oar-up DIR)\")",
                strict=bool(os.environ.get("NOYAU_TEST_OAR")))
    if _oar_user is None:
        u = OarUser(os.environ["NOYAU_OAR_USER"])
        u.prepare()
        _oar_user = u
    return _oar_user


def oarstat_noyau(user: str) -> list[dict[str, str]]:
    """The user's noyau jobs still queued or running, oldest first."""
    import subprocess

    out = subprocess.run(["oarstat", "-J", "-f", "-u", user], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    jobs = json.loads(out) if out.strip() else {}
    return [{"id": str(j["Job_Id"]), "state": j["state"], "name": j.get("name") or ""}
            for j in sorted(jobs.values(), key=lambda j: j["Job_Id"])
            if (j.get("name") or "").startswith("noyau-")
            and j["state"] not in ("Terminated", "Error")]


# --------------------------------------------------------------------------
# scheduler commands timed through a wrapper on PATH


def timing_wrapper(dirpath: Path, command: str, log: Path, real: str, slow: float = 0.0) -> Path:
    """`command` in dirpath: runs `real`, logging `start PID T` before and
    `end PID T` after it (T: seconds since the epoch). The logged interval
    contains the real command's run, so overlaps counted from it are an
    upper bound of what really overlapped. `slow` seconds more inside the
    interval stand for a loaded scheduler (overlaps easier to see)."""
    w = dirpath / command
    pause = f"sleep {slow}\n" if slow else ""
    w.write_text(f"#!/bin/sh\necho \"start $$ $(date +%s.%N)\" >> {log}\n{pause}"
                 f"{real} \"$@\"\nrc=$?\necho \"end $$ $(date +%s.%N)\" >> {log}\nexit $rc\n")
    w.chmod(0o755)
    return w


def timed_calls(log: Path) -> tuple[int, int, float]:
    """From a timing wrapper's log: (calls, most running at once, seconds
    from the first start to the last end)."""
    events = []
    for line in log.read_text().splitlines():
        what, _pid, t = line.split()
        events.append((float(t), 1 if what == "start" else -1))
    # an end and a start at the same instant: the end first
    events.sort(key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, d in events:
        running += d
        most = max(most, running)
    starts = sum(1 for _, d in events if d == 1)
    span = events[-1][0] - events[0][0] if events else 0.0
    return starts, most, span


# --------------------------------------------------------------------------
# the Grid Engine test cluster (scripts/sge-up, started by scripts/test as root)
#
# Its jobs run as root, as the Slurm tests' do. Grid Engine passes no
# environment to a job (noyau gives it its own in a 0600 file, `NOYAU_*`
# included), so the profile `sgetest` sets in the job what a user's own
# profile would: this session's Jupyter, IPython and XDG directories and the
# venv on PATH. conftest writes it into the session's user config.

SGE_KERNEL_NAME = "noyau-sge-python3"
SESSION_DIRS = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_PATH",
                "JUPYTER_PLATFORM_DIRS", "IPYTHONDIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "MPLCONFIGDIR")


def sge_profile(name: str = "sgetest", time: str = "10") -> str:
    """`[profiles.NAME]` on Grid Engine: queue all.q, `time`, this session's
    directories and PATH."""
    env = {k: os.environ[k] for k in SESSION_DIRS if k in os.environ}
    env["PATH"] = os.environ["PATH"]  # the venv's bin first (conftest)
    lines = ["", f"[profiles.{name}]", 'backend = "sge"', 'partition = "all.q"', f'time = "{time}"',
             "", f"[profiles.{name}.env]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def sge_up() -> bool:
    import subprocess

    if not os.environ.get("NOYAU_SGE_DIR"):
        return False
    try:
        return subprocess.run(["qstat"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_sge() -> None:
    """Skip without a cluster, except under CI (or with NOYAU_TEST_SGE=1), where that fails."""
    require_noyau()
    if sge_up():
        return
    missing("no Grid Engine test cluster (scripts/test starts one as root; by hand: "
            "eval \"$(scripts/sge-up DIR)\")", strict=bool(os.environ.get("NOYAU_TEST_SGE")))


def qstat_jobs() -> list[dict[str, str]]:
    """Every job line `qstat -xml` lists (this user's, waiting or running):
    id (`ID.TASK` for an array task line), state letters, name, and the job
    number alone (`job`)."""
    import subprocess
    import xml.etree.ElementTree as ET

    out = subprocess.run(["qstat", "-xml"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    jobs = []
    for j in ET.fromstring(out).iter("job_list"):
        number = j.findtext("JB_job_number", "")
        tasks = j.findtext("tasks") or ""
        ids = [number] if not tasks else [f"{number}.{t}" for t in _sge_tasks(tasks)]
        for i in ids:
            jobs.append({"id": i, "job": number, "state": j.findtext("state", ""),
                         "name": j.findtext("JB_name", "")})
    return jobs


def _sge_tasks(text: str) -> list[int]:
    """`3`, `3,5`, `2-6:1` → task ids."""
    out: list[int] = []
    for part in text.split(","):
        rng, _, step = part.partition(":")
        a, _, b = rng.partition("-")
        out += list(range(int(a), int(b or a) + 1, int(step or 1)))
    return out


def qstat_noyau() -> list[dict[str, str]]:
    """This user's noyau jobs still in Grid Engine (waiting or running)."""
    return [j for j in qstat_jobs() if j["name"].startswith("noyau-")]


def qacct(job: str, count: int = 1) -> list[dict[str, str]]:
    """`qacct -j JOB`'s records (one per array task), once it has `count`
    of them: polled (accounting is flushed every second on the test
    cluster)."""
    import subprocess

    def records() -> list[dict[str, str]] | None:
        r = subprocess.run(["qacct", "-j", job], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return None
        recs: list[dict[str, str]] = []
        for line in r.stdout.splitlines():
            if line.startswith("===="):
                recs.append({})
            elif recs and line.strip():
                k, _, v = line.partition(" ")
                recs[-1][k] = v.strip()
        return recs if len(recs) >= count else None

    return wait_until(records, 30, f"qacct's records of job {job}", 0.5)


class SgeCluster:
    name = "sge"
    kernel_name = SGE_KERNEL_NAME
    job_var = "JOB_ID"
    running, pending = "r", "qw"
    queue_note = "(partition all.q)"
    wait_reasons = ("slots",)

    def require(self) -> None:
        require_sge()

    def jobs(self) -> list[dict[str, str]]:
        return qstat_noyau()

    def cancel(self, job: str) -> None:
        import subprocess

        subprocess.run(["qdel", job], capture_output=True, check=False)

    def fill_the_node(self) -> str:
        """A job holding every slot of the host, from the queue `batch`
        (all.q's jobs then wait: the host has no slot left), running; its id."""
        import subprocess

        slots = next(int(l.split()[1]) for l in subprocess.run(
            ["qconf", "-sq", "batch"], capture_output=True, text=True, check=True).stdout.splitlines()
            if l.startswith("slots "))
        blocker = subprocess.run(
            ["qsub", "-terse", "-N", "noyau-test-blocker", "-q", "batch", "-pe", "smp", str(slots),
             "-l", "h_rt=300", "-S", "/bin/sh", "-o", "/dev/null", "-j", "y"],
            input="sleep 300\n", capture_output=True, text=True, check=True).stdout.strip()
        try:
            wait_until(lambda: any(j["id"] == blocker and j["state"] == "r" for j in self.jobs()),
                       30, "the blocker to run", 0.3)
        except AssertionError:
            self.cancel(blocker)
            raise
        return blocker

    def stop_controller(self) -> None:
        """sge_qmaster stopped: qstat, qsub and qdel fail until start_controller
        (the execution daemon keeps running the jobs)."""
        import subprocess

        pids = (Path(os.environ["NOYAU_SGE_DIR"]) / "pids").read_text().split("\n")
        pid = int([l.split()[1] for l in pids if l.startswith("sge_qmaster ")][-1])
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), 30, "sge_qmaster to stop", interval=0.2)
        assert subprocess.run(["qstat"], capture_output=True).returncode != 0

    def start_controller(self) -> None:
        """scripts/sge-up again: it starts the qmaster and waits for a probe
        job, keeping the jobs that run."""
        import subprocess

        root = Path(__file__).resolve().parents[2]
        subprocess.run([str(root / "scripts/sge-up"), os.environ["NOYAU_SGE_DIR"]], check=True,
                       stdout=subprocess.DEVNULL, env={**daemon_env(), "SGE_UP_KEEP_JOBS": "1"},
                       timeout=120)


# --------------------------------------------------------------------------
# every test cluster, for the tests that run on each (the `batch` fixture)


class SlurmCluster:
    """What a test needs of a scheduler: its noyau jobs, cancel, a blocker,
    and how its names read (OarCluster is the same for OAR)."""

    name = "slurm"
    kernel_name = SLURM_KERNEL_NAME
    job_var = "SLURM_JOB_ID"  # the job id's variable inside a job
    running, pending = "RUNNING", "PENDING"
    queue_note = "(partition debug)"  # where the queue note says the job waits
    wait_reasons = ("reason Resources", "reason Priority")

    def require(self) -> None:
        require_slurm()

    def jobs(self) -> list[dict[str, str]]:
        return squeue_noyau()

    def cancel(self, job: str) -> None:
        import subprocess

        subprocess.run(["scancel", job], check=False)

    def fill_the_node(self) -> str:
        return fill_the_node()

    def stop_controller(self) -> None:
        """slurmctld stopped: squeue and sbatch fail until start_controller."""
        import signal

        pid = int((Path(os.environ["NOYAU_SLURM_DIR"]) / "slurmctld.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), 20, "slurmctld to stop")

    def start_controller(self) -> None:
        import subprocess

        # without -c: it keeps its jobs
        subprocess.run(["slurmctld", "-f", os.environ["SLURM_CONF"]], check=True, env=daemon_env())
        wait_until(lambda: subprocess.run(["squeue", "-h"], capture_output=True).returncode == 0,
                   60, "slurmctld to answer again", interval=0.5)


class OarCluster:
    name = "oar"
    kernel_name = OAR_KERNEL_NAME
    job_var = "OAR_JOB_ID"
    running, pending = "Running", "Waiting"
    queue_note = "(partition default)"
    wait_reasons = ("reason Waiting",)

    def require(self) -> None:
        require_oar()

    def jobs(self) -> list[dict[str, str]]:
        return oarstat_noyau(os.environ["NOYAU_OAR_USER"])

    def cancel(self, job: str) -> None:
        import subprocess

        subprocess.run(["oardel", job], capture_output=True, check=False)

    def fill_the_node(self) -> str:
        """A job of the test user holding the whole node (queue `batch`),
        running; its id. The caller cancels it."""
        u = require_oar()
        r = u.run(["oarsub", "-q", "batch", "-n", "noyau-test-blocker", "-l",
                   "nodes=1,walltime=0:05:00", "-O", "/dev/null", "-E", "/dev/null", "sleep 300"],
                  u.home, check=True)
        blocker = r.stdout.split("OAR_JOB_ID=")[1].split()[0]
        try:
            # OAR schedules a queue other than the default at its next pass
            wait_until(lambda: any(j["id"] == blocker and j["state"] == "Running"
                                   for j in self.jobs()), 90, "the blocker to run", 0.5)
        except AssertionError:
            self.cancel(blocker)
            raise
        return blocker

    def stop_controller(self) -> None:
        """OAR's server (Almighty) and its PostgreSQL stopped: oarstat, oarsub
        and oardel fail until start_controller."""
        import signal
        import subprocess

        almighty = subprocess.run(["pgrep", "-o", "-u", "oar", "-f", "/usr/lib/oar/Almighty"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        os.killpg(os.getpgid(int(almighty)), signal.SIGTERM)
        wait_until(lambda: subprocess.run(["pgrep", "-u", "oar", "-f", "/usr/lib/oar/Almighty"],
                                          capture_output=True).returncode != 0,
                   20, "Almighty to stop", interval=0.2)
        ver, name = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True,
                                   check=True).stdout.split()[:2]
        subprocess.run(["pg_ctlcluster", ver, name, "stop"], check=True)
        assert subprocess.run(["oarstat", "-J"], capture_output=True).returncode != 0

    def start_controller(self) -> None:
        """scripts/oar-up again: it starts what is down and waits for a probe
        job to end Terminated, keeping the jobs that run."""
        import subprocess

        root = Path(__file__).resolve().parents[2]
        subprocess.run([str(root / "scripts/oar-up"), os.environ["NOYAU_OAR_DIR"]], check=True,
                       stdout=subprocess.DEVNULL, env={**daemon_env(), "OAR_UP_KEEP_JOBS": "1"},
                       timeout=120)


Cluster = SlurmCluster | OarCluster | SgeCluster
CLUSTERS: dict[str, Cluster] = {"slurm": SlurmCluster(), "oar": OarCluster(), "sge": SgeCluster()}
