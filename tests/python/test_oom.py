"""A kernel killed by the out-of-memory killer is reported as such.

The proxy, its agent and the kernel run in a real memory cgroup limited to
400 MiB (created by the test, as root); the cell allocates well past it, and
the kernel's cgroup OOM killer ends it. Needs a writable memory cgroup
(v1 `memory` controller or v2; root can make one on this project's
machines, cgroup v1's `memory` hierarchy): without one the test is skipped,
saying why, and under CI it fails.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import noyau_testlib as lib

LIMIT = 400 << 20


def _make_cgroup() -> tuple[Path, str]:
    """A fresh memory cgroup with LIMIT; returns (dir, procs file)."""
    name = f"noyau-test-{uuid.uuid4().hex[:8]}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() or (v1 / "cgroup.procs").exists():
        d = v1 / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(LIMIT))
        memsw = d / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(LIMIT))
        return d, str(d / "cgroup.procs")
    for v2 in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers").read_text():
            d = v2 / name
            d.mkdir()
            (d / "memory.max").write_text(str(LIMIT))
            (d / "memory.swap.max").write_text("0")
            return d, str(d / "cgroup.procs")
    raise OSError("no memory cgroup controller is mounted")


def test_oom_kill_is_reported(noyau_kernelspec: str, prefix: Path) -> None:
    try:
        cg, procs = _make_cgroup()
    except OSError as e:
        lib.missing(f"cannot make a memory cgroup here ({e}); the OOM report needs one (run as root)")
    spec = lib.read_kernelspec(prefix, noyau_kernelspec)
    # Enter the cgroup, then become the proxy: everything it starts is inside.
    spec["argv"] = ["sh", "-c", f'echo $$ > {procs} && exec "$0" "$@"', *spec["argv"]]
    name = f"noyau-oom-{cg.name}"
    d = prefix / "share" / "jupyter" / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    k = lib.Kernel(name)
    try:
        msg_id = k.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n")
        texts = [lib.message_text(m) for m in k.iopub_for(msg_id, lib.is_idle, 120)]
        said = [t for t in texts if "died" in t]
        assert said, f"no death message; IOPub said {texts!r}"
        assert "out-of-memory" in said[0] and "SIGKILL" in said[0], said[0]
        reply = k.reply_for(msg_id, 10)
        assert reply["content"]["status"] == "error"
    finally:
        k.shutdown()
        lib.wait_until(lambda: not Path(procs).read_text().split(), 30, "the cgroup to empty")
        os.rmdir(cg)
