"""Helpers shared by the end-to-end tests and bench/: process discovery through
/proc, polling with a deadline, and driving one kernel with jupyter_client.

Nothing here sleeps to stand in for synchronisation: every wait polls for a
condition and fails with a message when its deadline passes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

NOYAU_KERNEL_NAME = "noyau-python3"
DIRECT_KERNEL_NAME = "python3"

# Every process a test starts inherits NOYAU_TEST_SESSION (set by conftest) and,
# when started through start_kernel(), NOYAU_TEST_TAG: that is how leftovers are
# found even after they have been re-parented to init.
SESSION_VAR = "NOYAU_TEST_SESSION"
TAG_VAR = "NOYAU_TEST_TAG"


# Set by conftest: the error of `noyau install`, if it failed.
noyau_install_error: str | None = None

# jupyter_kernel_test outcomes per variant ("direct"/"noyau"), filled by conftest's
# report hook and checked by test_kernel_suite.py's last test.
SUITE_OUTCOMES: dict[str, dict[str, str]] = {"direct": {}, "noyau": {}}


def noyau_bin() -> str | None:
    return os.environ.get("NOYAU_BIN") or None


def require_noyau() -> None:
    """Skip without NOYAU_BIN; fail when NOYAU_BIN is set but the install failed."""
    import pytest

    if not noyau_bin():
        pytest.skip("NOYAU_BIN is not set")
    if noyau_install_error:
        pytest.fail(f"noyau install failed: {noyau_install_error}", pytrace=False)


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

    def __init__(self, kernel_name: str, stderr: Any = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 60, transport: str = "tcp"):
        from jupyter_client.manager import KernelManager

        self.tag = f"{os.environ.get(SESSION_VAR, 'nosession')}-{uuid.uuid4().hex[:12]}"
        kenv = dict(os.environ)
        kenv[TAG_VAR] = self.tag
        if env:
            kenv.update(env)
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
    import pytest

    require_noyau()
    if slurm_up():
        return
    if os.environ.get("CI") or os.environ.get("NOYAU_TEST_SLURM"):
        pytest.fail("no Slurm test cluster: scripts/test starts one as root (scripts/slurm-up)",
                    pytrace=False)
    pytest.skip("no Slurm test cluster (run as root: eval \"$(scripts/slurm-up DIR)\")")


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
