"""`jupyter console` (the real terminal frontend, in a pty) drives the kernel:
with --kernel NAME (the console starts and stops it) and with --existing
CONNECTION_FILE (a kernel started by a KernelManager, kept running with
`exit(keep_kernel=True)`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pexpect

import noyau_testlib as lib

_SGR = r"(?:\x1b\[[0-9;]*m)*"  # prompt_toolkit colours the prompt piece by piece
PROMPT = rf"In \[{_SGR}\d+{_SGR}\]: "


def jupyter() -> str:
    exe = Path(sys.executable).parent / "jupyter"
    return str(exe) if exe.exists() else (shutil.which("jupyter") or "jupyter")


def spawn(args: list[str], env: dict[str, str]) -> pexpect.spawn:
    child = pexpect.spawn(jupyter(), ["console", *args], env=env, encoding="utf-8",
                          timeout=60, dimensions=(40, 160))
    child.logfile_read = open(os.devnull, "w") if not os.environ.get("NOYAU_TEST_VERBOSE") else sys.stdout
    return child


def converse(child: pexpect.spawn, keep_kernel: bool = False) -> None:
    child.expect(PROMPT)
    child.sendline("print(6*7)")
    child.expect(r"42\r\n")
    child.expect(PROMPT)
    # `exit` runs in the kernel and comes back as an ask_exit payload
    if keep_kernel:
        child.sendline("exit(keep_kernel=True)")
        child.expect("keeping kernel alive")
    else:
        child.sendline("exit")
        child.expect("Shutting down kernel")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0, f"jupyter console exited {child.exitstatus} / signal {child.signalstatus}"


def test_console_kernel(kernel_name: str) -> None:
    tag = f"{os.environ.get(lib.SESSION_VAR)}-console-{kernel_name}"
    env = dict(os.environ, **{lib.TAG_VAR: tag})
    child = spawn(["--kernel", kernel_name], env)
    try:
        converse(child)
    finally:
        if child.isalive():
            child.kill(9)
    # the console shut its kernel down: nothing of it may remain
    lib.wait_until(lambda: not lib.tagged(lib.TAG_VAR, tag), 20,
                   "the kernel started by jupyter console to end")


def test_console_existing(kernel_name: str) -> None:
    k = lib.Kernel(kernel_name)
    try:
        child = spawn(["--existing", k.km.connection_file], dict(os.environ))
        try:
            converse(child, keep_kernel=True)
        finally:
            if child.isalive():
                child.kill(9)
        # `exit(keep_kernel=True)` from an --existing console leaves the kernel running
        assert k.km.is_alive()
        reply, iopub = k.run("print('after console')")
        assert lib.stream_text(iopub) == "after console\n"
    finally:
        k.shutdown()
