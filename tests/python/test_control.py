"""Interrupt, restart and a forged message, directly and through noyau."""

from __future__ import annotations

import re
import time
from pathlib import Path

import zmq
from jupyter_client.session import Session

import noyau_testlib as lib


def _sleeping_cell(k: lib.Kernel) -> str:
    msg_id = k.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "sleeping" in m["content"]["text"], 60)
    return msg_id


def _result(iopub: list[dict]) -> str | None:
    for m in iopub:
        if m["msg_type"] == "execute_result":
            return m["content"]["data"]["text/plain"]
    return None


def test_interrupt(kernel_name: str) -> None:
    k = lib.Kernel(kernel_name)
    try:
        msg_id = _sleeping_cell(k)
        t0 = time.monotonic()
        k.km.interrupt_kernel()
        reply = k.reply_for(msg_id, timeout=2.0)
        elapsed = time.monotonic() - t0
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        assert elapsed <= 2.0, f"interrupt took {elapsed:.2f} s"
        k.iopub_for(msg_id, lib.is_idle, 10)
        reply, iopub = k.run("1+1")
        assert reply["content"]["status"] == "ok"
        assert _result(iopub) == "2"
    finally:
        k.shutdown()


def test_restart_fresh_state_same_agent(kernel_name: str) -> None:
    k = lib.Kernel(kernel_name)
    try:
        reply, _ = k.run("restart_marker = 41")
        assert reply["content"]["status"] == "ok"
        agents = set()
        if kernel_name == lib.NOYAU_KERNEL_NAME:
            agents = lib.wait_until(k.agents, 10, "the noyau agent process")
            assert len(agents) == 1, f"expected one agent, found {agents}"
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        reply, iopub = k.run("restart_marker")
        assert reply["content"]["status"] == "error", "state survived the restart"
        assert reply["content"]["ename"] == "NameError"
        reply, iopub = k.run("20+22")
        assert _result(iopub) == "42"
        if agents:
            assert k.agents() == agents, "restart replaced the agent process"
    finally:
        k.shutdown()


def test_bad_signature_is_dropped_and_logged(kernel_name: str, tmp_path: Path) -> None:
    log = tmp_path / "kernel-stderr.log"
    with open(log, "wb") as f:
        k = lib.Kernel(kernel_name, stderr=f)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        info = k.km.get_connection_info()
        sep = "-" if info["transport"] == "ipc" else ":"
        sock.connect(f"{info['transport']}://{info['ip']}{sep}{info['shell_port']}")
        session = Session(key=info["key"], signature_scheme=info["signature_scheme"], username="forger")

        def request(code: str, expr: str) -> dict:
            return session.msg("execute_request", content={
                "code": code, "silent": False, "store_history": False,
                "user_expressions": {"v": expr}, "allow_stdin": False, "stop_on_error": False})

        forged = request("forged_marker = 1", "1")
        frames = [b"<IDS|MSG>", b"0" * 64] + [
            session.pack(forged[k_]) for k_ in ("header", "parent_header", "metadata", "content")]
        sock.send_multipart(frames)

        good = request("", "'forged_marker' in globals()")
        session.send(sock, good)

        # Shell requests are answered in order: once the good reply is here, a reply to the
        # forged one would have come first.
        replies: list[dict] = []
        deadline = time.monotonic() + 30
        while not any(r["parent_header"].get("msg_id") == good["header"]["msg_id"] for r in replies):
            assert time.monotonic() < deadline, "no reply to the correctly signed request"
            if sock.poll(200):
                _, msg = session.feed_identities(sock.recv_multipart())
                replies.append(session.deserialize(msg))
        assert not [r for r in replies if r["parent_header"].get("msg_id") == forged["header"]["msg_id"]], \
            "the forged request was answered"
        reply = replies[-1]["content"]
        assert reply["status"] == "ok"
        assert reply["user_expressions"]["v"]["data"]["text/plain"] == "False", \
            "the forged request was executed"

        lib.wait_until(lambda: re.search(r"signature|hmac", log.read_text(errors="replace"), re.I),
                       10, f"a log line about the bad signature in {log}")

        reply, iopub = k.run("1+1")
        assert reply["content"]["status"] == "ok" and _result(iopub) == "2"
    finally:
        sock.close()
        ctx.term()
        k.shutdown()
