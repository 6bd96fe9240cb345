"""Soak: many noyau kernels executing cells for a while, with links cut and
kernels killed at random, then a count of what arrived and what was left.

  --local N (20) kernels through the local backend and --slurm M (5) through
  Slurm (SLURM_CONF must name a running cluster with M free CPUs, e.g.
  `SLURM_UP_CPUS=8 scripts/slurm-up DIR`; without one they are skipped,
  saying so) run cells of --lines numbered lines each for --seconds.
  Each kernel's agent dials through its own TCP forwarder, which the chaos
  thread cuts for 0.2-2 s; it also SIGKILLs inner kernels, which the worker
  then restarts (the allocation is kept).

Reported: lines the finished cells printed (sent) vs lines received (must be
equal: nothing lost or repeated across cuts), cells failed by kills, kernels
restarted, leaked processes and Slurm jobs after shutdown (must be zero), and
peak memory (VmHWM) of the proxies and agents. Exit 1 if sent != received, a
cell's lines came out of order, or anything leaked.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TMP = Path(tempfile.mkdtemp(prefix="noyau-soak-"))
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
            "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
    d = TMP / var.lower()
    d.mkdir(mode=0o700)
    os.environ[var] = str(d)
PREFIX = TMP / "prefix"
os.environ["JUPYTER_PATH"] = str(PREFIX / "share" / "jupyter")
os.environ["NOYAU_TEST_SESSION"] = f"soak-{uuid.uuid4().hex[:8]}"
os.environ.setdefault("NOYAU_LOG", "warn")
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
sys.path.insert(0, str(ROOT / "tests" / "python"))

import noyau_testlib as lib  # noqa: E402
from test_link_cut import Forwarder  # noqa: E402

# What the proxies and agents log (faults are expected here) goes to a file.
KERNEL_LOG = (TMP / "kernels.log").open("w")


def install(noyau_bin: str, slurm: bool) -> None:
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(PREFIX),
                    "--name", "python3"], check=True, capture_output=True)
    subprocess.run([noyau_bin, "install", "--name", "soak-local", "--inner", "python3",
                    "--backend", "local", "--prefix", str(PREFIX)], check=True, capture_output=True)
    if slurm:
        cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text('[profiles.soak]\npartition = "debug"\ntime = "30"\nmem = "500M"\n')
        subprocess.run([noyau_bin, "install", "--name", "soak-slurm", "--inner", "python3",
                        "--backend", "slurm", "--profile", "soak", "--prefix", str(PREFIX)],
                       check=True, capture_output=True)


def forwarded(base: str, i: str) -> tuple[str, Forwarder]:
    """A copy of kernelspec `base` whose agent dials through a forwarder."""
    bind, advertise = lib.free_port(), lib.free_port()
    spec = json.loads((PREFIX / "share" / "jupyter" / "kernels" / base / "kernel.json").read_text())
    spec["argv"] += ["--link-bind", f"127.0.0.1:{bind}", "--link-advertise", f"127.0.0.1:{advertise}"]
    name = f"{base}-{i}"
    d = PREFIX / "share" / "jupyter" / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    fwd = Forwarder(advertise, bind)
    fwd.start()
    return name, fwd


class Worker:
    def __init__(self, kid: str, base: str, lines: int) -> None:
        self.kid, self.base, self.lines = kid, base, lines
        self.spec, self.fwd = forwarded(base, kid)
        self.k: lib.Kernel | None = None
        self.sent = self.received = self.cells = self.failed = self.restarts = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()  # held while the kernel restarts: no kill then
        self.pids: set[int] = set()

    def start(self) -> None:
        # One IPython history database per kernel: 25 kernels sharing one
        # print "database is locked" warnings into their cells' output.
        ipython = TMP / f"ipython-{self.kid}"
        ipython.mkdir(mode=0o700, exist_ok=True)
        self.k = lib.Kernel(self.spec, ready_timeout=300, stderr=KERNEL_LOG, env={"IPYTHONDIR": str(ipython)})

    def run(self, stop: threading.Event) -> None:
        assert self.k
        n = 0
        while not stop.is_set():
            n += 1
            code = f"for i in range({self.lines}):\n    print('{self.kid} {n}', i)\n"
            msg_id = self.k.execute(code)
            msgs = self.collect(msg_id, 300)
            if msgs is None:
                self.errors.append(f"{self.kid} cell {n}: no idle within 300 s and the kernel is alive")
                return
            reply = {"content": {"status": "dead"}} if msgs == ["dead"] else self.k.reply_for(msg_id, 60)
            got = "".join(m["content"]["text"] for m in msgs if isinstance(m, dict)
                          and m["msg_type"] == "stream" and m["content"]["name"] == "stdout").splitlines()
            if reply["content"]["status"] == "ok":
                self.cells += 1
                self.sent += self.lines
                self.received += len(got)
                want = [f"{self.kid} {n} {i}" for i in range(self.lines)]
                if got != want:
                    extra = [line for line in got if line not in set(want)]
                    dups = len(got) - len(set(got)) - len(extra)
                    missing = len(set(want) - set(got))
                    self.errors.append(f"{self.kid} cell {n}: {len(got)} lines, not the {self.lines} in order "
                                       f"({missing} missing, {dups} repeated, foreign: {extra[:3]!r})")
            else:
                # A kill: the cell's output up to the death is not counted.
                self.failed += 1
                with self.lock:
                    for p in self.k.processes():
                        self.pids.add(p)
                    try:
                        self.k.km.restart_kernel(now=True)
                        self.k.kc.wait_for_ready(timeout=120)
                        self.restarts += 1
                    except Exception as e:  # noqa: BLE001 - reported, the run goes on
                        self.errors.append(f"{self.kid}: restart failed: {e}")
                        return

    def collect(self, msg_id: str, timeout: float) -> list | None:
        """The cell's IOPub up to its idle; ["dead"] if the kernel process
        ended first (killed between two cells: the death went to IOPub with
        no cell to fail, and a frontend sees the process end, as here)."""
        assert self.k
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.k.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                if not self.k.km.is_alive():
                    return ["dead"]
                continue
            if m["parent_header"].get("msg_id") == msg_id:
                got.append(m)
                if lib.is_idle(m):
                    return got
        return None

    def kill_inner(self) -> bool:
        assert self.k
        if not self.lock.acquire(blocking=False):
            return False
        try:
            inner = self.k.inner_kernels()
            for p in inner:
                lib.kill(p, signal.SIGKILL)
            return bool(inner)
        finally:
            self.lock.release()

    def peak_kib(self) -> tuple[int, int]:
        """VmHWM of this kernel's proxy and agent (KiB); (0, 0) while it restarts."""
        assert self.k
        if not self.lock.acquire(blocking=False):
            return 0, 0
        try:
            procs = self.k.processes()
        finally:
            self.lock.release()
        proxy = max((lib.vm_hwm_kib(p) or 0 for p in procs if lib.is_proxy(p)), default=0)
        agent = max((lib.vm_hwm_kib(p) or 0 for p in procs if lib.is_agent(p)), default=0)
        return proxy, agent


def chaos(workers: list[Worker], stop: threading.Event, every: float, counts: dict[str, int]) -> None:
    rng = random.Random(int(os.environ.get("SOAK_SEED", "1")))
    while not stop.wait(rng.uniform(every / 2, every * 1.5)):
        w = rng.choice(workers)
        if rng.random() < 0.6:
            w.fwd.cut()
            if stop.wait(rng.uniform(0.2, 2.0)):
                w.fwd.restore()
                return
            w.fwd.restore()
            counts["link cuts"] += 1
        elif w.kill_inner():
            counts["kernel kills"] += 1


def squeue_jobs() -> list[str]:
    r = subprocess.run(["squeue", "--me", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30)
    return [line for line in r.stdout.splitlines() if " soak-" in line or " noyau-" in line]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--local", type=int, default=20)
    ap.add_argument("--slurm", type=int, default=5)
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--chaos-every", type=float, default=2.0, help="mean seconds between faults")
    a = ap.parse_args()
    noyau_bin = os.environ["NOYAU_BIN"]
    slurm = a.slurm > 0 and lib.slurm_up()
    if a.slurm and not slurm:
        print(f"soak: no Slurm cluster (SLURM_CONF): the {a.slurm} Slurm kernels are skipped")
    install(noyau_bin, slurm)
    plan = [("soak-local", f"L{i}") for i in range(a.local)]
    plan += [("soak-slurm", f"S{i}") for i in range(a.slurm if slurm else 0)]
    workers = []
    for base, kid in plan:
        workers.append(Worker(kid, base, a.lines))
    t0 = time.monotonic()
    starters = [threading.Thread(target=w.start) for w in workers]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    print(f"soak: {len(workers)} kernels started in {time.monotonic() - t0:.1f} s")

    stop = threading.Event()
    counts = {"link cuts": 0, "kernel kills": 0}
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    monkey = threading.Thread(target=chaos, args=(workers, stop, a.chaos_every, counts))
    monkey.start()
    peak_proxy = peak_agent = 0
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        for w in workers:
            p, ag = w.peak_kib()
            peak_proxy, peak_agent = max(peak_proxy, p), max(peak_agent, ag)
    stop.set()
    monkey.join()
    for t in threads:
        t.join(timeout=600)

    all_pids: set[int] = set()
    for w in workers:
        assert w.k
        all_pids |= w.k.processes() | w.pids
        w.k.shutdown()
        w.fwd.stop()
    left: set[int] = set()
    try:
        lib.wait_until(lambda: not (left.clear() or left.update(
            {p for p in all_pids if lib.alive(p)} | lib.tagged(lib.SESSION_VAR, os.environ["NOYAU_TEST_SESSION"]))),
            60, "every process to end", interval=0.5)
    except AssertionError:
        pass
    jobs: list[str] = []
    if slurm:
        try:
            lib.wait_until(lambda: not squeue_jobs(), 90, "every soak job to leave the queue", interval=1)
        except AssertionError:
            jobs = squeue_jobs()

    sent = sum(w.sent for w in workers)
    received = sum(w.received for w in workers)
    errors = [e for w in workers for e in w.errors]
    print(f"soak: {a.local} local + {a.slurm if slurm else 0} Slurm kernels, {a.seconds:.0f} s, "
          f"{a.lines} lines per cell, a fault every ~{a.chaos_every:g} s")
    print(f"  cells finished       {sum(w.cells for w in workers)}")
    print(f"  lines sent           {sent}")
    print(f"  lines received       {received}  ({'equal' if sent == received else 'DIFFERENT'})")
    print(f"  link cuts            {counts['link cuts']}")
    print(f"  kernel kills         {counts['kernel kills']} ({sum(w.failed for w in workers)} cells failed, "
          f"{sum(w.restarts for w in workers)} restarts)")
    print(f"  leaked processes     {len(left)}" + "".join(f"\n    {p}: {' '.join(lib.cmdline(p))[:100]}" for p in left))
    print(f"  leaked Slurm jobs    {len(jobs)}" + "".join(f"\n    {j}" for j in jobs))
    print(f"  kernels' log         {KERNEL_LOG.name}")
    print(f"  peak VmHWM           proxy {peak_proxy / 1024:.1f} MiB, agent {peak_agent / 1024:.1f} MiB")
    for e in errors[:20]:
        print(f"  error: {e}")
    for p in left:
        lib.kill(p)
    return 0 if sent == received and not errors and not left and not jobs else 1


if __name__ == "__main__":
    sys.exit(main())
