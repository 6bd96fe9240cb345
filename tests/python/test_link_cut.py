"""The agent↔proxy link is cut and restored in the middle of a cell printing
100,000 numbered lines; afterwards every line has arrived exactly once, in
order.

The agent is told (--link-advertise) to dial a TCP forwarder run by this test,
which forwards to where the proxy listens (--link-bind). Cutting aborts every
live forwarded connection and closes the listener, so reconnects are refused
until it is restored.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path

import noyau_testlib as lib

LINES = 100_000
CUT_AT = LINES // 5  # cut once 20% of the lines have arrived
CUT_FOR = 1.0  # seconds the link stays down

# ~2 s of output: 200 flushed chunks of 500 lines with a 10 ms pause, so the cut
# falls in the middle of the cell rather than after it.
CELL = f"""\
import sys, time
for i in range({LINES}):
    print(f"line {{i:06d}}")
    if i % 500 == 499:
        sys.stdout.flush()
        time.sleep(0.01)
"""


class Forwarder:
    """A TCP forwarder on its own event loop thread that can be cut and restored."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.conns: dict[int, tuple[asyncio.BaseTransport, asyncio.BaseTransport]] = {}
        self.accepted = 0
        self.aborted = 0
        self.bytes_to_proxy = 0

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up:
                    self.bytes_to_proxy += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        key = id(writer)
        self.conns[key] = (writer.transport, up_writer.transport)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))
        finally:
            self.conns.pop(key, None)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port,
                                                 reuse_address=True)

    async def _cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for pair in list(self.conns.values()):
            if not all(t.is_closing() for t in pair):
                self.aborted += 1
            for t in pair:
                t.abort()
        self.server = None

    def start(self) -> None:
        self._call(self._start())

    restore = start

    def cut(self) -> None:
        self._call(self._cut())

    def stop(self) -> None:
        if self.server is not None:
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _forwarded_spec(noyau_kernelspec: str, prefix: Path) -> tuple[str, Forwarder]:
    """A kernelspec whose agent dials through a fresh forwarder (started)."""
    bind, advertise = lib.free_port(), lib.free_port()
    spec = lib.read_kernelspec(prefix, noyau_kernelspec)
    spec["argv"] = spec["argv"] + ["--link-bind", f"127.0.0.1:{bind}",
                                   "--link-advertise", f"127.0.0.1:{advertise}"]
    name = f"noyau-linkcut-{advertise}"
    d = prefix / "share" / "jupyter" / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec, indent=1))
    fwd = Forwarder(advertise, bind)
    fwd.start()
    return name, fwd


def test_output_lost_to_a_full_buffer_is_reported(noyau_kernelspec: str, prefix: Path, tmp_path: Path) -> None:
    """With the link down longer than its buffer lasts, the user is told how
    much output was lost, and the kernel goes on."""
    name, fwd = _forwarded_spec(noyau_kernelspec, prefix)
    marker = tmp_path / "produced"
    k = None
    try:
        k = lib.Kernel(name, env={"NOYAU_LINK_BUFFER_MB": "1"})
        msg_id = k.execute(
            "import time, pathlib\n"
            "print('start', flush=True)\n"
            "for i in range(400):\n"
            "    print('x' * 10_000, flush=True)\n"
            f"pathlib.Path({str(marker)!r}).write_text('done')\n"
            "print('end', flush=True)\n")
        k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "start" in m["content"]["text"], 60)
        fwd.cut()
        # The kernel writes the marker once all 4 MB have gone to the agent.
        lib.wait_until(marker.exists, 60, "the cell to produce its output while the link is down")
        fwd.restore()
        texts = [m["content"]["text"] for m in k.iopub_for(msg_id, lib.is_idle, 120) if m["msg_type"] == "stream"]
        reply = k.reply_for(msg_id, 30)
        assert reply["content"]["status"] == "ok", reply["content"]
        lost = [t for t in texts if "were lost" in t]
        assert lost, "no notice of lost output"
        assert "NOYAU_LINK_BUFFER_MB" in lost[0], lost[0]
        assert texts[-1].endswith("end\n"), texts[-1][-80:]
    finally:
        if k is not None:
            k.shutdown()
        fwd.stop()


def test_link_cut_mid_cell(noyau_kernelspec: str, prefix: Path) -> None:
    name, fwd = _forwarded_spec(noyau_kernelspec, prefix)
    k = None
    try:
        k = lib.Kernel(name)
        assert fwd.accepted >= 1, "the agent did not dial the advertised address"
        msg_id = k.execute(CELL)
        text: list[str] = []
        count = 0
        cut_at = restored_at = None
        idle = False
        deadline = time.monotonic() + 180
        while not idle:
            assert time.monotonic() < deadline, f"cell not finished; {count} lines so far"
            if cut_at is not None and restored_at is None and time.monotonic() - cut_at >= CUT_FOR:
                fwd.restore()
                restored_at = time.monotonic()
            try:
                m = k.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream":
                assert m["content"]["name"] == "stdout", m["content"]
                text.append(m["content"]["text"])
                count += m["content"]["text"].count("\n")
                if cut_at is None and count >= CUT_AT:
                    fwd.cut()
                    cut_at = time.monotonic()
            idle = lib.is_idle(m)
        assert cut_at is not None, "the cell ended before 20% of its lines arrived"
        assert restored_at is not None, "the cell ended while the link was cut"
        assert fwd.aborted >= 1, "there was no live link connection to cut"
        assert fwd.accepted >= 2, "the agent never reconnected"
        reply = k.reply_for(msg_id, 30)
        assert reply["content"]["status"] == "ok", reply["content"]

        lines = "".join(text).splitlines()
        expected = [f"line {i:06d}" for i in range(LINES)]
        if lines != expected:
            seen = set()
            dups = [x for x in lines if x in seen or seen.add(x)]  # type: ignore[func-returns-value]
            missing = sorted(set(expected) - set(lines))
            first_bad = next(i for i, (a, b) in enumerate(zip(lines + [""] * LINES, expected)) if a != b)
            raise AssertionError(
                f"{len(lines)} lines, {len(missing)} missing (first {missing[:3]}), "
                f"{len(dups)} duplicated (first {dups[:3]}), first difference at line {first_bad}")

        reply, iopub = k.run("print('still here')")
        assert lib.stream_text(iopub) == "still here\n"
    finally:
        if k is not None:
            k.shutdown()
        fwd.stop()


def test_link_cut_for_good(noyau_kernelspec: str, prefix: Path) -> None:
    """The link never comes back: the agent redials for NOYAU_LINK_GIVE_UP
    seconds, then stops the kernel and ends; the running cell fails saying
    the agent is gone, and no process of the kernel is left."""
    name, fwd = _forwarded_spec(noyau_kernelspec, prefix)
    k = None
    try:
        k = lib.Kernel(name, env={"NOYAU_LINK_GIVE_UP": "3"})
        msg_id = k.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(600)")
        k.iopub_for(msg_id, lambda m: m["msg_type"] == "stream" and "sleeping" in m["content"]["text"], 60)
        pids = k.processes()
        assert any(lib.is_agent(p) for p in pids) and any(lib.is_inner_kernel(p) for p in pids)
        fwd.cut()
        reply = k.reply_for(msg_id, 60)
        assert reply["content"]["status"] == "error", reply["content"]
        assert "agent" in reply["content"]["evalue"] and "gone" in reply["content"]["evalue"], reply["content"]
        lib.wait_until(lambda: not [p for p in pids if lib.alive(p)], 30, "every process of the kernel to end")
    finally:
        if k is not None:
            k.kc.stop_channels()
            k.km.shutdown_kernel(now=True)
        fwd.stop()
