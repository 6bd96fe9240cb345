"""kill -9 of the inner kernel and of the agent in the middle of a cell.

The frontend must see the death within 5 s, and once it has shut the kernel
down no process of this kernel may be left (a bounded wait, polling /proc;
NOYAU_TEST_CLEANUP_TIMEOUT seconds, 20 by default).

Through noyau the contract is: an IOPub error/stream whose text says "died"
and names the signal, an error execute_reply to the running request, then the
proxy exits. Directly, ipykernel just dies: its process exit is the signal.
"""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError
from nbformat.v4 import new_code_cell, new_notebook

import noyau_testlib as lib

DEATH_DEADLINE = 5.0
CLEANUP_TIMEOUT = float(os.environ.get("NOYAU_TEST_CLEANUP_TIMEOUT", "20"))


def _sleeping_cell(k: lib.Kernel) -> str:
    msg_id = k.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "sleeping" in m["content"]["text"], 60)
    return msg_id


class Seen:
    """What the client saw of the death, polled from both channels and the process."""

    def __init__(self) -> None:
        self.iopub: list[str] = []
        self.error_reply = False
        self.exited = False

    def poll(self, k: lib.Kernel, msg_id: str) -> None:
        for _ in range(100):
            try:
                m = k.kc.get_iopub_msg(timeout=0.02)
            except queue.Empty:
                break
            if m["msg_type"] in ("error", "stream", "display_data"):
                text = lib.message_text(m)
                if "died" in text:
                    self.iopub.append(text)
        for _ in range(10):
            try:
                m = k.kc.get_shell_msg(timeout=0.01)
            except queue.Empty:
                break
            if m["parent_header"].get("msg_id") == msg_id and m["content"]["status"] == "error":
                self.error_reply = True
        self.exited = not k.km.is_alive()


def _see_death(k: lib.Kernel, msg_id: str, noyau: bool, words: list[str]) -> Seen:
    seen = Seen()
    t0 = time.monotonic()

    def done() -> bool:
        seen.poll(k, msg_id)
        if noyau:
            return bool(seen.error_reply and any(all(w in t for w in words) for t in seen.iopub))
        return seen.exited

    try:
        lib.wait_until(done, DEATH_DEADLINE, "the death to be reported", interval=0)
    except AssertionError:
        raise AssertionError(
            f"after {time.monotonic() - t0:.1f} s: IOPub death messages {seen.iopub!r}, "
            f"error reply {seen.error_reply}, process exited {seen.exited}; "
            f"wanted {'IOPub text with ' + repr(words) + ' and an error reply' if noyau else 'exit'}"
        ) from None
    return seen


def _assert_cleaned_up(k: lib.Kernel, pids: set[int]) -> None:
    def gone() -> bool:
        return not ({p for p in pids if lib.alive(p)} | lib.tagged(lib.TAG_VAR, k.tag))

    try:
        lib.wait_until(gone, CLEANUP_TIMEOUT, "every process of the kernel to end", interval=0.1)
    except AssertionError:
        left = {p for p in pids if lib.alive(p)} | lib.tagged(lib.TAG_VAR, k.tag)
        raise AssertionError("left over: " + "; ".join(
            f"{p}: {' '.join(lib.cmdline(p))[:100]}" for p in sorted(left))) from None


def _give_up(k: lib.Kernel) -> None:
    """What a frontend does with a dead kernel it will not restart."""
    k.kc.stop_channels()
    k.km.shutdown_kernel(now=True)


# Signals `nohup` (SIGHUP) and a non-interactive shell's `&` (SIGQUIT,
# SIGINT) leave ignored for every program started below them.
INHERITED_IGNORED = (signal.SIGHUP, signal.SIGQUIT)


def _started_with_ignored(kernel_name: str, sig: int | None) -> lib.Kernel:
    """A kernel started by a process that ignores `sig` (its proxy, and the
    agent the proxy starts, inherit that)."""
    if sig is None:
        return lib.Kernel(kernel_name)
    before = signal.signal(sig, signal.SIG_IGN)
    try:
        return lib.Kernel(kernel_name)
    finally:
        signal.signal(sig, before)


def _inner_pid(k: lib.Kernel, noyau: bool) -> int:
    if not noyau:
        return k.launched_pid
    inner = lib.wait_until(k.inner_kernels, 10, "the inner ipykernel process")
    assert len(inner) == 1, f"expected one inner kernel, found {inner}"
    return next(iter(inner))


def test_output_sent_just_before_the_kernel_exits_all_arrives(noyau_kernelspec: str) -> None:
    """A cell writes 4 MB and ends its kernel (`exit()`: ipykernel stops
    0.1 s after the cell): what the kernel sent before it exited, still in
    the agent's sockets when the agent sees the exit, reaches the frontend
    whole and before the news of the death (the reply is the kernel's
    own, not the error the proxy gives cells the death left waiting)."""
    k = lib.Kernel(noyau_kernelspec)
    n = 4_000_000
    try:
        reply, iopub = k.run(f"import sys\nsys.stdout.write('x' * {n})\nsys.stdout.flush()\nexit()")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert lib.stream_text(iopub) == "x" * n, len(lib.stream_text(iopub))
        lib.wait_until(lambda: not k.km.is_alive(), 30, "the kernel's proxy to end with its kernel")
    finally:
        _give_up(k)


def test_kill_inner_kernel(kernel_name: str) -> None:
    noyau = kernel_name == lib.NOYAU_KERNEL_NAME
    k = lib.Kernel(kernel_name)
    try:
        msg_id = _sleeping_cell(k)
        inner = _inner_pid(k, noyau)
        if noyau:
            lib.wait_until(k.agents, 10, "the agent process")
        pids = k.processes()
        lib.kill(inner, signal.SIGKILL)
        _see_death(k, msg_id, noyau, ["died", "SIGKILL"])
    finally:
        _give_up(k)
    _assert_cleaned_up(k, pids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS,
                                 signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_inner_kernel_killed_by_each_signal(noyau_kernelspec: str, sig: int) -> None:
    """Whatever signal ends the kernel, the cell fails naming it, and the
    next start works (a restart keeps the agent). SIGHUP and SIGQUIT end it
    even when whatever started Jupyter ignored them (`nohup`, a script's
    `&`), as a kernel inherits an ignored signal unless noyau resets it."""
    k = _started_with_ignored(noyau_kernelspec, sig if sig in INHERITED_IGNORED else None)
    pids: set[int] = set()
    try:
        msg_id = _sleeping_cell(k)
        inner = _inner_pid(k, True)
        agents = lib.wait_until(k.agents, 10, "the agent process")
        lib.kill(inner, sig)
        _see_death(k, msg_id, True, ["died", signal.Signals(sig).name])
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=60)
        reply, _ = k.run("1")
        assert reply["content"]["status"] == "ok"
        assert k.agents() == agents
        pids = k.processes()
    finally:
        k.shutdown()
    _assert_cleaned_up(k, pids)


def test_kill_9_of_the_proxy_ends_agent_and_kernel(noyau_kernelspec: str) -> None:
    """The proxy (the process Jupyter started) killed: the agent redials for
    NOYAU_LINK_GIVE_UP seconds, then stops the kernel and ends."""
    k = lib.Kernel(noyau_kernelspec, env={"NOYAU_LINK_GIVE_UP": "3", "NOYAU_REATTACH_GRACE": "3"})
    try:
        _sleeping_cell(k)
        lib.wait_until(k.agents, 10, "the agent process")
        lib.wait_until(k.inner_kernels, 10, "the inner kernel")
        pids = k.processes()
        lib.kill(k.launched_pid, signal.SIGKILL)
    finally:
        _give_up(k)
    _assert_cleaned_up(k, pids)


def test_kill_agent(noyau_kernelspec: str) -> None:
    k = lib.Kernel(noyau_kernelspec)
    try:
        msg_id = _sleeping_cell(k)
        agents = lib.wait_until(k.agents, 10, "the agent process")
        assert len(agents) == 1, f"expected one agent, found {agents}"
        lib.wait_until(k.inner_kernels, 10, "the inner ipykernel process")
        pids = k.processes()
        lib.kill(next(iter(agents)), signal.SIGKILL)
        _see_death(k, msg_id, True, ["agent", "died"])
    finally:
        _give_up(k)
    _assert_cleaned_up(k, pids)


def test_restart_after_inner_kernel_death(kernel_name: str) -> None:
    noyau = kernel_name == lib.NOYAU_KERNEL_NAME
    k = lib.Kernel(kernel_name)
    pids: set[int] = set()
    try:
        k.run("before_death = 1")
        msg_id = _sleeping_cell(k)
        inner = _inner_pid(k, noyau)
        agents = lib.wait_until(k.agents, 10, "the agent process") if noyau else set()
        lib.kill(inner, signal.SIGKILL)
        _see_death(k, msg_id, noyau, ["died", "SIGKILL"])

        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=60)
        reply, iopub = k.run("print(40 + 2)\n'before_death' in globals()")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert lib.stream_text(iopub) == "42\n"
        assert [m["content"]["data"]["text/plain"] for m in iopub
                if m["msg_type"] == "execute_result"] == ["False"]
        if noyau:
            assert k.agents() == agents, "the restarted proxy did not re-attach to the same agent"
        pids = k.processes()
    finally:
        k.shutdown()
    _assert_cleaned_up(k, pids)


def test_nbclient_sees_death(kernel_name: str) -> None:
    """A cell that SIGKILLs its own kernel: nbclient stops with an error, promptly."""
    nb = new_notebook(cells=[new_code_cell(
        "import os, signal\nprint('about to die', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"),
        new_code_cell("print('never')")])
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=60)
    t0 = time.monotonic()
    with pytest.raises((DeadKernelError, CellExecutionError, RuntimeError)) as err:
        client.execute()
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"nbclient needed {elapsed:.1f} s to notice"
    assert "never" not in str(nb.cells[1].get("outputs"))
    if kernel_name == lib.NOYAU_KERNEL_NAME and isinstance(err.value, CellExecutionError):
        assert "died" in str(err.value) + str(nb.cells[0].outputs)
