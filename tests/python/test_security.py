"""Secrets stay out of argv and out of the kernel; private files are private;
an inner kernelspec that asks for message interrupts gets them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import noyau_testlib as lib


def test_secrets_never_on_a_command_line(noyau_kernelspec: str) -> None:
    k = lib.Kernel(noyau_kernelspec)
    try:
        reply, _ = k.run("1")
        assert reply["content"]["status"] == "ok"
        agents = lib.wait_until(k.agents, 10, "the agent")
        (agent,) = agents
        # /proc/PID/environ shows the environment the agent was started with.
        env = lib.environ(agent)
        token, pin = env.get("NOYAU_LINK_TOKEN"), env.get("NOYAU_LINK_PIN")
        assert token and pin, "the agent did not get its secrets through its environment"
        key = k.km.get_connection_info()["key"]
        key = key.decode() if isinstance(key, bytes) else key
        secrets = {"link token": token, "certificate pin": pin, "frontend HMAC key": key}
        for pid in lib.pids():
            argv = " ".join(lib.cmdline(pid))
            for what, value in secrets.items():
                assert value not in argv, f"the {what} is on the command line of {pid}: {argv[:120]}"
        (inner,) = lib.wait_until(k.inner_kernels, 10, "the inner kernel")
        inner_env = lib.environ(inner)
        for var in ("NOYAU_LINK_TOKEN", "NOYAU_LINK_PIN", "NOYAU_LINK_ADDR"):
            assert var not in inner_env, f"the kernel inherited {var}"
        # The kernel's own connection file (key B) and its directory are private.
        conn = next(a for a in lib.cmdline(inner) if a.endswith(".json"))
        assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600, oct(os.stat(conn).st_mode)
        assert stat.S_IMODE(os.stat(os.path.dirname(conn)).st_mode) == 0o700
    finally:
        k.shutdown()


def test_agent_refuses_an_open_runtime_dir(noyau_bin: str, tmp_path: Path) -> None:
    open_dir = tmp_path / "rt"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    env = dict(os.environ, NOYAU_RUNTIME_DIR=str(open_dir), NOYAU_LINK_ADDR="127.0.0.1:9",
               NOYAU_LINK_PIN="00", NOYAU_LINK_TOKEN="00")
    r = subprocess.run([noyau_bin, "agent"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "0700" in r.stderr and str(open_dir) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "panicked" not in r.stderr


def test_inner_kernel_interrupted_by_message(noyau_bin: str, prefix: Path) -> None:
    """An inner kernelspec with interrupt_mode "message" gets interrupt_request."""
    base = lib.read_kernelspec(prefix, lib.DIRECT_KERNEL_NAME)
    base["interrupt_mode"] = "message"
    base["display_name"] = "Python 3 (message interrupts)"
    d = prefix / "share" / "jupyter" / "kernels" / "python3-msgint"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(base))
    subprocess.run([noyau_bin, "install", "--name", "noyau-msgint", "--inner", "python3-msgint",
                    "--prefix", str(prefix)], check=True, capture_output=True)
    k = lib.Kernel("noyau-msgint")
    try:
        msg_id = k.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
        k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "sleeping" in m["content"]["text"], 60)
        t0 = time.monotonic()
        k.km.interrupt_kernel()
        reply = k.reply_for(msg_id, timeout=2.0)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        assert time.monotonic() - t0 <= 2.0
        reply, _ = k.run("1+1")
        assert reply["content"]["status"] == "ok"
    finally:
        k.shutdown()
