"""Security properties, each proven on real processes: secrets stay out of
argv, job names, logs and Slurm's view; private files and directories are
private and noyau refuses open ones; the link refuses wrong tokens, replayed
tokens and wrong certificates, and logs it; messages with bad signatures are
dropped on every socket; an inner kernelspec that asks for message interrupts
gets them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import stat
import struct
import subprocess
import time
from pathlib import Path

import noyau_testlib as lib


def _secrets(k: lib.Kernel) -> dict[str, str]:
    """The link token, certificate pin and both HMAC keys of a running kernel."""
    (agent,) = lib.wait_until(k.agents, 60, "the agent")
    # /proc/PID/environ shows the environment the agent was started with.
    env = lib.environ(agent)
    token, pin = env.get("NOYAU_LINK_TOKEN"), env.get("NOYAU_LINK_PIN")
    assert token and pin, "the agent did not get its secrets through its environment"
    key = k.km.get_connection_info()["key"]
    key = key.decode() if isinstance(key, bytes) else key
    (inner,) = lib.wait_until(k.inner_kernels, 10, "the inner kernel")
    conn = next(a for a in lib.cmdline(inner) if a.endswith(".json"))
    inner_key = json.loads(Path(conn).read_text())["key"]
    assert key and inner_key and key != inner_key
    return {"link token": token, "certificate pin": pin, "frontend HMAC key": key,
            "kernel HMAC key": inner_key}


def _assert_nowhere(secrets: dict[str, str], places: dict[str, str]) -> None:
    for where, text in places.items():
        for what, value in secrets.items():
            assert value not in text, f"the {what} appears in {where}"


def _argv_of_every_process() -> dict[str, str]:
    return {f"the command line of {pid}": " ".join(lib.cmdline(pid)) for pid in lib.pids()}


def test_secrets_never_on_a_command_line(noyau_kernelspec: str, tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        k = lib.Kernel(noyau_kernelspec, stderr=err, env={"NOYAU_LOG": "debug"})
    try:
        reply, _ = k.run("1")
        assert reply["content"]["status"] == "ok"
        secrets = _secrets(k)
        _assert_nowhere(secrets, _argv_of_every_process())
        (inner,) = k.inner_kernels()
        inner_env = lib.environ(inner)
        for var in ("NOYAU_LINK_TOKEN", "NOYAU_LINK_PIN", "NOYAU_LINK_ADDR"):
            assert var not in inner_env, f"the kernel inherited {var}"
        # The kernel's own connection file (key B), its directory and the ipc
        # sockets in it are private: only the owner can enter the directory.
        conn = next(a for a in lib.cmdline(inner) if a.endswith(".json"))
        assert stat.S_IMODE(os.stat(conn).st_mode) == 0o600, oct(os.stat(conn).st_mode)
        rundir = os.path.dirname(conn)
        assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
        sockets = [e for e in os.scandir(rundir) if stat.S_ISSOCK(e.stat().st_mode)]
        assert len(sockets) == 5, os.listdir(rundir)
        assert os.stat(rundir).st_uid == os.getuid()
    finally:
        k.shutdown()
    _assert_nowhere(secrets, {"the proxy's and agent's log (debug level)": log.read_text()})


def test_secrets_stay_out_of_slurm(slurm: None, tmp_path: Path) -> None:
    """In a Slurm job: not in any argv, the job name, `scontrol show job`, the
    batch script, the job's log or the proxy's log."""
    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        k = lib.Kernel(lib.SLURM_KERNEL_NAME, stderr=err, env={"NOYAU_LOG": "debug"},
                       ready_timeout=120)
    try:
        reply, iopub = k.run("import os; print(os.environ['SLURM_JOB_ID'])", timeout=120)
        assert reply["content"]["status"] == "ok"
        job = lib.stream_text(iopub).strip()
        secrets = _secrets(k)
        places = _argv_of_every_process()

        def out(*cmd: str) -> str:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout

        places["scontrol show job"] = out("scontrol", "show", "job", "-dd", job)
        places["squeue"] = out("squeue", "-a", "-h", "-o", "%all")
        places["the batch script"] = out("scontrol", "write", "batch_script", job, "-")
        assert "noyau agent" in places["the batch script"]
        jobs_dir = Path(os.environ["XDG_STATE_HOME"]) / "noyau" / "jobs"
        (job_log,) = jobs_dir.glob(f"*-{job}.log")
        places["the job's log"] = job_log.read_text()
        _assert_nowhere(secrets, places)
    finally:
        k.shutdown()
    _assert_nowhere(secrets, {"the proxy's log (debug level)": log.read_text(),
                              "the job's log": job_log.read_text()})


def test_proxy_refuses_an_open_connection_file(noyau_bin: str, tmp_path: Path) -> None:
    conn = tmp_path / "kernel-x.json"
    conn.write_text(json.dumps({"shell_port": 0, "iopub_port": 0, "stdin_port": 0, "control_port": 0,
                                "hb_port": 0, "ip": "127.0.0.1", "key": "k" * 32, "transport": "tcp",
                                "signature_scheme": "hmac-sha256"}))
    conn.chmod(0o644)
    r = subprocess.run([noyau_bin, "kernel", "-f", str(conn)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert str(conn) in r.stderr and "chmod 600" in r.stderr, r.stderr
    assert "panicked" not in r.stderr


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


def _link_hello(addr: str, token: str) -> tuple[str, int, bytes]:
    """Dials the proxy's link as an agent would and presents `token`; returns
    the certificate's pin and the proxy's answer (frame kind, body)."""
    host, port = addr.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is checked below, as the agent does
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        pin = hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
        body = bytes([1, 1]) + token.encode()  # kind HELLO, protocol version 1
        tls.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
    assert len(data) >= 5, f"the proxy hung up without an answer: {data!r}"
    return pin, data[4], data[5:4 + struct.unpack(">I", data[:4])[0]]


REFUSED = 4


def test_link_refuses_wrong_token_replay_and_wrong_certificate(noyau_kernelspec: str, noyau_bin: str,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        k = lib.Kernel(noyau_kernelspec, stderr=err)
    try:
        reply, _ = k.run("x = 1")
        assert reply["content"]["status"] == "ok"
        (agent,) = k.agents()
        env = lib.environ(agent)
        addr, pin, token = env["NOYAU_LINK_ADDR"], env["NOYAU_LINK_PIN"], env["NOYAU_LINK_TOKEN"]

        # A wrong token: refused, on the link whose certificate the agent pins.
        seen_pin, kind, body = _link_hello(addr, "f" * 64)
        assert seen_pin == pin.lower()
        assert kind == REFUSED and b"token" in body, (kind, body)
        # The agent's own token, replayed: it worked once, never again.
        _, kind, body = _link_hello(addr, token)
        assert kind == REFUSED and b"already used" in body, (kind, body)

        # An agent given another certificate's pin (a man in the middle, as the
        # agent sees it) refuses the proxy before sending its token.
        rt = tmp_path / "rt"
        rt.mkdir(mode=0o700)
        wrong = dict(os.environ, NOYAU_RUNTIME_DIR=str(rt), NOYAU_LINK_ADDR=addr,
                     NOYAU_LINK_PIN="ab" * 32, NOYAU_LINK_TOKEN="e" * 64, NOYAU_LINK_GIVE_UP="5")
        r = subprocess.run([noyau_bin, "agent"], env=wrong, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "does not match the pin" in r.stderr, r.stderr[-2000:]
        assert "panicked" not in r.stderr

        # Each refusal is in the proxy's log, without the tokens.
        def refusals() -> list[str]:
            return [line for line in log.read_text().splitlines() if "refused connection" in line]

        lines = lib.wait_until(lambda: len(refusals()) >= 3 and refusals(), 10, "three refusals logged")
        text = "\n".join(lines)
        assert "unknown or already used token" in text and "TLS" in text, text
        assert token not in log.read_text() and "f" * 64 not in log.read_text()
        # The kernel never noticed.
        reply, iopub = k.run("x += 1; print(x)")
        assert lib.stream_text(iopub) == "2\n"
    finally:
        k.shutdown()


def test_bad_signatures_are_dropped_on_every_socket(noyau_kernelspec: str, tmp_path: Path) -> None:
    """Forged messages (signed with another key) on shell, control and stdin
    from the frontend, and on IOPub from the kernel's side, are dropped and
    logged; genuine ones on the same sockets still work."""
    from jupyter_client.session import Session

    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        k = lib.Kernel(noyau_kernelspec, stderr=err)
    try:
        forger = Session(key=b"not-the-key", session=k.kc.session.session)
        # shell: a forged execute_request is never run nor answered.
        forged = forger.msg("execute_request", {"code": "print('FORGED')", "silent": False,
                                                 "store_history": True, "user_expressions": {},
                                                 "allow_stdin": False, "stop_on_error": True})
        forger.send(k.kc.shell_channel.socket, forged)
        reply, iopub = k.run("print('genuine')")
        assert lib.stream_text(iopub) == "genuine\n"
        # control: a forged shutdown_request does not stop the kernel.
        forger.send(k.kc.control_channel.socket, forger.msg("shutdown_request", {"restart": False}))
        # stdin: a forged input_reply does not answer the kernel's prompt.
        msg_id = k.execute("x = input('?'); print('got', x)", allow_stdin=True)
        req = k.kc.get_stdin_msg(timeout=30)
        assert req["msg_type"] == "input_request"
        forger.send(k.kc.stdin_channel.socket, forger.msg("input_reply", {"value": "FORGED"},
                                                         parent=req["header"]))
        k.kc.input("real")
        msgs = k.iopub_for(msg_id, lib.is_idle, 30)
        assert lib.stream_text(msgs) == "got real\n"
        # Nothing ever answered the forged requests.
        while k.kc.shell_channel.msg_ready():
            m = k.kc.get_shell_msg(timeout=1)
            assert m["parent_header"].get("msg_id") != forged["header"]["msg_id"], m
        assert k.km.is_alive()
        reply, _ = k.run("1")
        assert reply["content"]["status"] == "ok"
        # The kernel's side: an IOPub message signed with another key never
        # reaches the frontend; the genuine one after it does.
        code = ("from jupyter_client.session import Session\n"
                "kern = get_ipython().kernel\n"
                "bad = Session(key=b'not-the-key', session=kern.session.session)\n"
                "bad.send(kern.iopub_socket, 'stream', {'name': 'stdout', 'text': 'FORGED\\n'},"
                " parent=kern.get_parent())\n"
                "print('genuine', flush=True)")
        reply, iopub = k.run(code)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert lib.stream_text(iopub) == "genuine\n"
        def logged() -> str:
            return re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())  # no colours

        text = lib.wait_until(lambda: logged().count("dropped a message") >= 4 and logged(),
                              10, "four dropped messages logged")
        for lane in ("Shell", "Control", "Stdin"):
            assert f"lane={lane}" in text and "dropped a message from the frontend" in text, text[-3000:]
        assert "dropped a message from the kernel" in text, text[-3000:]
    finally:
        k.shutdown()


# --------------------------------------------------------------------------
# Kernels and targets (issue 18): empty HMAC keys, runtime directory
# squatting, the bubblewrap sandbox (in test_env.py), the shared cache.


def _connection_file(path: Path, key: str) -> Path:
    """A tcp connection file as jupyter_client writes it, with `key`."""
    from jupyter_client.connect import write_connection_file

    ports = {f"{c}_port": lib.free_port() for c in ("shell", "iopub", "stdin", "control", "hb")}
    write_connection_file(str(path), ip="127.0.0.1", key=key.encode(), **ports)
    return path


def test_an_empty_hmac_key_is_refused_unless_allowed_with_a_warning(noyau_bin: str, tmp_path: Path) -> None:
    """Jupyter allows `"key": ""` (unsigned messages); noyau refuses it, as
    it could not tell a forged message from a real one, unless
    `--allow-unsigned` is given, and then it says so in its log."""
    from jupyter_client.blocking import BlockingKernelClient

    conn = _connection_file(tmp_path / "kernel-unsigned.json", "")
    assert json.loads(conn.read_text())["key"] == ""
    r = subprocess.run([noyau_bin, "kernel", "-f", str(conn)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    assert "empty" in r.stderr and "--allow-unsigned" in r.stderr and str(conn) in r.stderr, r.stderr
    assert "panicked" not in r.stderr

    log = tmp_path / "proxy.log"
    with log.open("w") as err:
        p = subprocess.Popen([noyau_bin, "kernel", "-f", str(conn), "--allow-unsigned"], stderr=err)
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = kc.execute_interactive("print('unsigned ok')", timeout=60,
                                       output_hook=lambda m: out.append(lib.message_text(m)))
        assert reply["content"]["status"] == "ok" and "unsigned ok" in "".join(out), (reply, out)
        assert "empty key" in log.read_text() and "--allow-unsigned" in log.read_text(), log.read_text()
        kc.shutdown()
        assert p.wait(timeout=30) == 0
    finally:
        kc.stop_channels()
        if p.poll() is None:
            p.kill()
            p.wait()


def _run_notebook(noyau_bin: str, d: Path, code: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    """`noyau run` of a one-cell notebook in `d`, in an environment with
    six; (process, the cell's text)."""
    from test_run_noyau import notebook

    (d / "nb.ipynb").write_text(json.dumps(notebook(code)))
    (d / "noyau.toml").write_text('[environment]\nrequirements = ["six==1.16.0"]\n')
    p = subprocess.run([noyau_bin, "run", "nb.ipynb", "out.ipynb", "--no-progress", "--start-timeout", "300"],
                       cwd=d, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    out = json.loads((d / "out.ipynb").read_text()) if (d / "out.ipynb").exists() else {"cells": [{}]}
    cell = out["cells"][0]
    text = "".join("".join(o.get("text", "")) + o.get("evalue", "") for o in cell.get("outputs", []))
    return p, text


def test_a_cache_entry_planted_by_another_user_is_refused_and_rebuilt_in_the_users_own(
        noyau_bin: str, tmp_path: Path) -> None:
    """A group-writable shared cache (NOYAU_ENV_CACHE) holds the entry a
    spec asks for, but it belongs to another user (`nobody`, who could have
    put anything in its venv: here a .pth line that runs at every start).
    noyau refuses it, says so in the run's log, and builds the environment
    in the user's own cache instead; the planted code never runs."""
    if os.geteuid() != 0:
        lib.missing("planting a cache entry as another user (nobody) needs root")
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    shared, own = tmp_path / "shared", tmp_path / "own-cache"
    shared.mkdir()
    shared.chmod(0o2775)  # a team's cache: every member of the group writes there
    env = {"NOYAU_ENV_CACHE": str(shared), "XDG_CACHE_HOME": str(own)}
    code = "import six, sys; print(six.__version__, sys.prefix)"
    (tmp_path / "first").mkdir()
    p, text = _run_notebook(noyau_bin, tmp_path / "first", code, env)
    assert p.returncode == 0, p.stderr[-3000:]
    (entry,) = [e for e in shared.iterdir() if (e / "noyau-env.json").is_file()]
    assert text.split() == ["1.16.0", str(entry / "venv")], text

    # Another user's entry now: theirs, with their code in its venv.
    (site,) = (entry / "venv" / "lib").glob("python3*/site-packages")
    (site / "planted.pth").write_text("import sys; print('PLANTED', flush=True)\n")
    for path in [entry, *entry.rglob("*")]:
        os.lchown(path, nobody, nobody)
    (tmp_path / "second").mkdir()
    p, text = _run_notebook(noyau_bin, tmp_path / "second", code, env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PLANTED" not in text, text
    version, prefix = text.split()
    assert version == "1.16.0" and Path(prefix).is_relative_to(own), text
    refusal = [line for line in p.stderr.splitlines() if "refusing the shared cache's entry" in line]
    assert refusal and str(entry) in refusal[0] and f"belongs to uid {nobody}" in refusal[0], p.stderr[-3000:]


def test_a_squatted_runtime_dir_falls_back_to_a_private_one_and_restarts_keep_the_agent(
        noyau_kernelspec: str, tmp_path: Path) -> None:
    """Without XDG_RUNTIME_DIR the runtime directory is $TMPDIR/noyau-UID;
    another user (`nobody`) made it first. The kernel still starts, in a
    private fallback beside it (0700, ours), the proxy warns, and a restart
    finds the handover record there and keeps the same agent."""
    if os.geteuid() != 0:
        lib.missing("squatting the runtime directory as another user (nobody) needs root")
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # like /tmp
    squat = tmp / f"noyau-{os.getuid()}"
    squat.mkdir()
    squat.chmod(0o755)
    os.chown(squat, nobody, nobody)
    log = tmp_path / "proxy.log"
    err = log.open("w")  # open for the restart's launch too
    k = lib.Kernel(noyau_kernelspec, stderr=err, env={"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": None})
    try:
        reply, _ = k.run("marker = 1")
        assert reply["content"]["status"] == "ok"
        (agent,) = lib.wait_until(k.agents, 10, "the agent")
        (inner,) = lib.wait_until(k.inner_kernels, 10, "the inner kernel")
        conn = Path(next(a for a in lib.cmdline(inner) if a.endswith(".json")))
        (fallback,) = [d for d in tmp.iterdir() if d.name.startswith(f"{squat.name}-")]
        assert conn.is_relative_to(fallback), conn
        st = fallback.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert f"not using {squat}" in log.read_text(), log.read_text()[-2000:]
        assert not list(squat.iterdir()), "noyau wrote into the squatted directory"

        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        reply, _ = k.run("marker")
        assert reply["content"]["ename"] == "NameError", reply["content"]  # a fresh kernel
        assert k.agents() == {agent}, "the restart did not find its handover record: a new agent"
    finally:
        k.shutdown()
        err.close()
