"""Usage sampled from the job's cgroup, on a real Slurm that confines jobs
in cgroups as production nodes do (scripts/slurm-up with SLURM_UP_CGROUP=1:
proctrack/cgroup, task/cgroup, jobacct_gather/cgroup; cgroup.conf with
ConstrainRAMSpace and ConstrainCores; cgroup v1 on this project's machines,
as on many RHEL 8 nodes, v2 where the machine mounts only v2).

This test starts that cluster for itself (the other Slurm tests keep the
session's, without cgroups): a noyau kernel in a job of `mem = 300M` opens
the `noyau` comm; its usage samples come from the job's cgroup (Slurm's
`job_J`, above the `step_batch/task_0` the kernel sits in), with the job's
300 MiB limit (not the node's memory), memory that grows by the 100 MB a
cell allocates, and the CPU a spinning cell gets (about one core on an
idle machine; checked against the kernel's own CPU time in /proc, the
machine being shared). Needs root
(slurmd makes the cgroups); without it the test is skipped, saying why, and
under CI it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

import noyau_testlib as lib
from test_comm import Comm, opened

ROOT = Path(__file__).resolve().parents[2]
KERNEL_NAME = "noyau-slurm-cgroup-python3"
PROFILE = """
[profiles.cgroup]
backend = "slurm"
partition = "debug"
time = "10"
mem = "300M"
"""
LIMIT = 300 << 20


@pytest.fixture(scope="module")
def cgroup_slurm(prefix: Path, noyau_bin: str) -> Iterator[dict[str, str]]:
    """A Slurm cluster of its own with cgroups, and the kernelspec whose
    profile `cgroup` asks for 300M; the environment that reaches it."""
    lib.require_noyau()
    if os.geteuid() != 0:
        lib.missing("the cgroup Slurm needs root (slurmd makes the jobs' cgroups)")
    d = Path(tempfile.mkdtemp(prefix="noyau-slurm-cgroup-"))
    r = subprocess.run([str(ROOT / "scripts/slurm-up"), str(d)], capture_output=True, text=True,
                       env={**lib.daemon_env(), "SLURM_UP_CGROUP": "1"}, timeout=300)
    try:
        assert r.returncode == 0, f"scripts/slurm-up with SLURM_UP_CGROUP=1 failed:\n{r.stderr}"
        env = {"SLURM_CONF": str(d / "slurm.conf"), "NOYAU_SLURM_DIR": str(d)}
        cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        if "[profiles.cgroup]" not in (cfg.read_text() if cfg.exists() else ""):
            with cfg.open("a") as f:
                f.write(PROFILE)
        subprocess.run([noyau_bin, "install", "--name", KERNEL_NAME, "--inner", "python3",
                        "--backend", "slurm", "--profile", "cgroup", "--prefix", str(prefix),
                        "--display-name", "Python 3 (noyau slurm, cgroups)"],
                       check=True, capture_output=True, timeout=60)
        yield env
    finally:
        subprocess.run([str(ROOT / "scripts/slurm-down"), str(d)], check=False, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def job_cgroup(job: str, kpid: int) -> Path:
    """The job's memory cgroup as Slurm made it (v1, else v2): the `job_J`
    above the kernel's cgroup, from /proc/PID/cgroup."""
    lines = Path(f"/proc/{kpid}/cgroup").read_text().splitlines()
    fields = [l.split(":", 2) for l in lines]
    v1 = [(n, rel) for _, n, rel in fields if "memory" in n.split(",")]
    v2 = [rel for _, n, rel in fields if not n]
    v2_roots = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
    candidates = ([(Path("/sys/fs/cgroup") / n, rel) for n, rel in v1]
                  + [(root, rel) for rel in v2 for root in v2_roots])
    for root, rel in candidates:
        parts = rel.strip("/").split("/")
        if f"job_{job}" in parts:
            d = root.joinpath(*parts[:parts.index(f"job_{job}") + 1])
            if d.is_dir():
                return d
    raise AssertionError(f"the kernel {kpid} is in no cgroup of job {job}: {lines}")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (utime + stime, /proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def test_usage_comes_from_the_jobs_cgroup(cgroup_slurm: dict[str, str]) -> None:
    k = lib.Kernel(KERNEL_NAME, env=cgroup_slurm, ready_timeout=60)
    try:
        c = Comm(k)
        opened(c)
        sampled = c.state(lambda s: s["job"] and s["job"]["state"] == "running" and s["usage"] is not None,
                          180, "a usage sample from the running job")
        first, job = sampled["usage"], sampled["job"]["id"]
        assert first["source"] in ("cgroup-v1", "cgroup"), first
        # the job's limit, as Slurm set it on the job's cgroup: not the node's memory
        assert first["mem_limit_bytes"] == LIMIT, first
        reply, iopub = k.run("import os; print(os.getpid())")
        kpid = int(lib.stream_text(iopub).strip())
        cg = job_cgroup(job, kpid)
        limit_file = cg / ("memory.limit_in_bytes" if first["source"] == "cgroup-v1" else "memory.max")
        assert int(limit_file.read_text()) == LIMIT, limit_file
        assert 0 < first["mem_bytes"] < LIMIT, first

        reply, _ = k.run("block = b'x' * (100 << 20)")
        assert reply["content"]["status"] == "ok", reply
        grown = c.state(lambda s: s["usage"]["mem_bytes"] > first["mem_bytes"] + (90 << 20), 30,
                        "the job's memory to grow by the 100 MB the cell allocated")["usage"]
        assert grown["mem_bytes"] < first["mem_bytes"] + (150 << 20), (first, grown)
        print(f"memory {first['mem_bytes'] >> 20} -> {grown['mem_bytes'] >> 20} MiB of {LIMIT >> 20} MiB")

        # CPU: the sample's rate against the spinning kernel's own CPU time
        # (/proc, read by the test as each sample arrives): the machine is
        # shared, so the cell gets what the load leaves it, up to one core;
        # it spins until the test has its third sample (a file it makes)
        stop = Path(tempfile.mkdtemp(prefix="noyau-usage-spin-")) / "stop"
        msg_id = k.execute("import os, time\nt = time.monotonic()\n"
                           f"while not os.path.exists({str(stop)!r}) and time.monotonic() - t < 120:\n"
                           "    sum(range(10000))")
        c.messages(lambda m: m["parent_header"].get("msg_id") == msg_id
                   and m["content"].get("execution_state") == "busy", 30, "the cell's busy")
        at = c.state(lambda s: True, 15, "a sample while the cell spins")["usage"]["at"]
        s2 = c.state(lambda s: s["usage"]["at"] != at, 15, "the next sample")["usage"]
        t2, cpu2 = time.monotonic(), cpu_seconds(kpid)
        s3 = c.state(lambda s: s["usage"]["at"] != s2["at"], 15, "the sample after")["usage"]
        t3, cpu3 = time.monotonic(), cpu_seconds(kpid)
        spun = (cpu3 - cpu2) * 100 / (t3 - t2)
        print(f"cpu {s3['cpu_percent']:.0f}% sampled ({s3['source']}), the kernel's /proc {spun:.0f}%")
        stop.touch()
        assert s3["source"] == first["source"], s3
        assert 0 < s3["cpu_percent"] < 130, (s3, spun)
        assert abs(s3["cpu_percent"] - spun) < 20, (s3, spun)
        reply = k.reply_for(msg_id, 30)
        assert reply["content"]["status"] == "ok", reply
        shutil.rmtree(stop.parent, ignore_errors=True)
    finally:
        k.shutdown()
