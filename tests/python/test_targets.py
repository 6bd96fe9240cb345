"""Cell-level delegation: `%%noyau on TARGET` runs a cell in another kernel
(its own agent and allocation, here the local backend), keeps its state,
routes interrupts to it, and ends with the notebook's kernel."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

import noyau_testlib as lib


@pytest.fixture
def km(noyau_kernelspec: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n\n'
                                         '[profiles.other]\nbackend = "local"\nkernel = "python3-other"\n')
    global _tag
    _tag = f"targets-{tmp_path.name}"
    m = lib.kernel_in(noyau_kernelspec, tmp_path, {"NOYAU_TEST_TAG": _tag})
    _proxies[:] = [m.provisioner.process.pid]
    yield m
    lib.stop_kernel(m)


def run(km, code: str, timeout: float = 60, out: list[dict] | None = None):  # type: ignore[no-untyped-def]
    """(reply, the cell's stream and plain-text display text, its errors)."""
    out = [] if out is None else out
    reply = km.kc.execute_interactive(code, timeout=timeout, output_hook=out.append)
    text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    text += "".join(m["content"]["data"].get("text/plain", "") + "\n"
                    for m in out if m["msg_type"] == "display_data")
    errors = [m["content"] for m in out if m["msg_type"] == "error"]
    return reply["content"], text, errors


_proxies: list[int] = []
_tag = ""


def agents() -> set[int]:
    """Agents started by this test's notebook kernel (its proxy's descendants;
    they outlive it only if noyau failed to end them, so remember the proxy)."""
    return {p for proxy in _proxies for p in lib.descendants(proxy) if lib.is_agent(p) and lib.alive(p)} | {
        p for p in lib.pids() if lib.is_agent(p) and lib.alive(p) and lib.environ(p).get("NOYAU_TEST_TAG") == _tag}


def test_cell_runs_on_target_keeps_state_and_says_where(km) -> None:  # type: ignore[no-untyped-def]
    _, main_pid, _ = run(km, "import os; print(os.getpid())")
    before = agents()
    out: list[dict] = []
    reply, text, _ = run(km, "%%noyau on side\nimport os\nprint(os.getpid())\nsecret = 41", out=out)
    assert reply["status"] == "ok", reply
    lines = text.splitlines()
    # The where-line is a neutral display (nbclient keeps it; Lab does not paint it red).
    shown = [m["content"]["data"]["text/plain"] for m in out if m["msg_type"] == "display_data"]
    assert len(shown) == 1 and shown[0].startswith("[noyau] on target side (local job local:"), out
    assert not any(m["msg_type"] == "stream" and m["content"]["name"] == "stderr" for m in out), out
    target_pid = next(line for line in lines if line.isdigit())
    assert target_pid != main_pid.strip()
    assert len(agents() - before) == 1, "a second agent should run the target"
    reply, text, _ = run(km, "%%noyau on side --quiet\nprint(secret + 1)")
    assert text == "42\n", text
    reply, text, errors = run(km, "print('secret' in globals())")
    assert text == "False\n", "the notebook's own kernel must not see the target's state"
    reply, text, _ = run(km, "%noyau targets")
    assert "side" in text and "local" in text, text


def test_target_cells_keep_the_notebooks_execution_count(km) -> None:  # type: ignore[no-untyped-def]
    """Cells run on a target count as the notebook's cells: three in a row
    show 1, 2, 3 (not the target's counts), and the notebook kernel's next
    cell shows 4, then a cell on the target again 5."""
    counts = []
    for code in ("%%noyau on side --quiet\nx = 1", "%%noyau on side --quiet\nx", "%%noyau on side\nx + 1",
                 "y = 2", "%%noyau on side --quiet\nx + 2"):
        out: list[dict] = []
        reply, _, _ = run(km, code, out=out)
        assert reply["status"] == "ok", reply
        shown = {m["content"]["execution_count"] for m in out if m["msg_type"] in ("execute_input", "execute_result")}
        assert shown <= {reply["execution_count"]}, (code, shown, reply)
        counts.append(reply["execution_count"])
    assert counts == [1, 2, 3, 4, 5], counts


def test_a_target_cell_aborted_behind_an_error_takes_no_count(km) -> None:  # type: ignore[no-untyped-def]
    """A cell queued behind a failing one is aborted by its kernel without
    running: like the kernel, the notebook gives it no count."""
    run(km, "%%noyau on side --quiet\nx = 1")  # the target is up
    # The second request reaches the target's kernel while the first runs.
    failing = km.kc.execute("%%noyau on side --quiet\nimport time\ntime.sleep(1)\n1/0")
    queued = km.kc.execute("%%noyau on side --quiet\nx = 2")
    replies: dict[str, dict] = {}
    while len(replies) < 2:
        r = km.kc.get_shell_msg(timeout=60)
        replies[r["parent_header"]["msg_id"]] = r["content"]
    assert replies[failing]["status"] == "error" and replies[failing]["execution_count"] == 2, replies
    assert replies[queued]["status"] == "aborted", replies
    reply, text, _ = run(km, "%%noyau on side --quiet\nprint(x)")
    assert text == "1\n", text
    assert reply["execution_count"] == 3, reply


def test_interrupt_reaches_the_target_only(km) -> None:  # type: ignore[no-untyped-def]
    run(km, "main_alive = True")
    msg_id = km.kc.execute("%%noyau on side --quiet\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    deadline = time.monotonic() + 60
    while True:
        m = km.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream" and "sleeping" in m["content"]["text"]:
            break
    t0 = time.monotonic()
    km.interrupt_kernel()
    while True:
        r = km.kc.get_shell_msg(timeout=5)
        if r["parent_header"].get("msg_id") == msg_id:
            break
    assert r["content"]["ename"] == "KeyboardInterrupt", r["content"]
    assert time.monotonic() - t0 <= 2.0
    _, text, _ = run(km, "print(main_alive)")
    assert text == "True\n"


def test_release_and_shutdown_end_target_agents(km) -> None:  # type: ignore[no-untyped-def]
    before = agents()
    run(km, "%%noyau on side\nx = 1")
    started = agents() - before
    assert len(started) == 1
    reply, text, _ = run(km, "%noyau release side")
    assert "releasing target side" in text
    # Its variables went with it, whether or not its job has ended yet.
    reply, _, _ = run(km, "%noyau pull side x")
    assert reply["status"] == "error" and ("being released" in reply["evalue"]
                                           or "no target named" in reply["evalue"]), reply
    # A cell sent while the released target's job is still ending gets a new target.
    reply, text, _ = run(km, "%%noyau on side --quiet\nprint('x' in globals())")
    assert reply["status"] == "ok" and text == "False\n", (reply, text)
    lib.wait_until(lambda: not (started & agents()), 20, "the released target's agent to end")
    again = agents() - before
    assert again, "the target did not start again"
    _, text, _ = run(km, "%noyau targets")
    assert "side" in text and "idle" in text, text
    km.kc.stop_channels()
    km.shutdown_kernel()
    lib.wait_until(lambda: not (again & agents()), 20, "the target's agent to end with the notebook's kernel")


def test_unknown_target_is_a_clear_error(km) -> None:  # type: ignore[no-untyped-def]
    reply, _, errors = run(km, "%%noyau on sdie\n1")
    assert reply["status"] == "error"
    assert "sdie" in reply["evalue"] and "side" in reply["evalue"], reply["evalue"]
    reply, _, _ = run(km, "%%noyau sdie\n1")
    assert reply["ename"] == "UsageError"
    reply, text, _ = run(km, "1 + 1")
    assert reply["status"] == "ok"


def test_cell_runs_in_a_slurm_job(km) -> None:  # type: ignore[no-untyped-def]
    """A notebook kernel here, one cell in a Slurm job (profile `test`)."""
    lib.require_slurm()
    reply, text, _ = run(km, "%%noyau on test\nimport os\nprint('job', os.environ.get('SLURM_JOB_ID'))", timeout=120)
    assert reply["status"] == "ok", reply
    job = next(line.split()[1] for line in text.splitlines() if line.startswith("job "))
    assert job.isdigit(), text
    assert f"[noyau] on target test (slurm job {job}" in text, text
    assert any(j["id"] == job for j in lib.squeue_noyau()), "the target's job is not in the queue"
    km.kc.stop_channels()
    km.shutdown_kernel()
    lib.wait_until(lambda: not any(j["id"] == job for j in lib.squeue_noyau()), 30,
                   "the target's job to end with the notebook's kernel", interval=0.5)


@pytest.mark.parametrize("end", ["shutdown", "sigterm"])
def test_a_slurm_targets_job_is_cancelled_before_the_kernel_exits(km, end: str) -> None:  # type: ignore[no-untyped-def]
    """The kernel's end waits for its targets' cancels: once its process has
    exited, the target's job has left the queue (not left running to its
    agent, which would end it only when it gives up redialling). A shutdown
    request releases the targets while the kernel still ends; Jupyter's
    SIGTERM (to a kernel that did not end after its request) only as the
    process ends."""
    lib.require_slurm()
    reply, text, _ = run(km, "%%noyau on test --quiet\nimport os\nprint('job', os.environ['SLURM_JOB_ID'])",
                         timeout=120)
    assert reply["status"] == "ok", reply
    job = next(line.split()[1] for line in text.splitlines() if line.startswith("job "))
    proxy = km.provisioner.process
    km.kc.stop_channels()
    if end == "shutdown":
        km.shutdown_kernel()
        assert proxy.poll() == 0, f"the kernel's process did not end by itself: {proxy.returncode}"
    else:
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=60) == 143
    held = [j for j in lib.squeue_noyau() if j["id"] == job and j["state"] != "COMPLETING"]
    assert not held, f"the target's job is still in the queue after the kernel exited: {held}"


def test_queued_target_shows_its_reason_and_the_notebook_stays_usable(km) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    lib.require_slurm()
    blocker = lib.fill_the_node()
    try:
        msg_id = km.kc.execute("%%noyau on test\nprint('ran on the target')")
        seen: list[dict] = []

        def note_with_reason() -> bool:
            try:
                m = km.kc.get_iopub_msg(timeout=0.2)
            except Exception:
                return False
            if m["parent_header"].get("msg_id") == msg_id:
                seen.append(m)
            return m["msg_type"] in ("display_data", "update_display_data") and "reason" in lib.message_text(m)

        lib.wait_until(note_with_reason, 60, "the queue note with Slurm's reason", interval=0)
        text = lib.message_text(seen[-1])
        assert "queued on slurm job" in text and "(target test)" in text, text
        # the notebook's own kernel answers meanwhile
        other = km.kc.execute_interactive("print(6 * 7)", timeout=30, output_hook=seen.append)
        assert other["content"]["status"] == "ok"
        subprocess.run(["scancel", blocker], check=True)
        rest: list[dict] = []
        deadline = time.monotonic() + 120
        while not any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                      and m["parent_header"].get("msg_id") == msg_id for m in rest):
            assert time.monotonic() < deadline, [m["msg_type"] for m in rest]
            try:
                m = km.kc.get_iopub_msg(timeout=1)
            except Exception:
                continue
            if m["parent_header"].get("msg_id") == msg_id:
                rest.append(m)
        types = [m["msg_type"] for m in rest]
        assert "clear_output" in types and types.index("clear_output") < types.index("stream"), types
        assert "ran on the target" in lib.stream_text(rest)
    finally:
        subprocess.run(["scancel", blocker], check=False)


def test_push_and_pull_a_numpy_array(km) -> None:  # type: ignore[no-untyped-def]
    run(km, "import numpy as np\narr = np.arange(12, dtype=np.float64).reshape(3, 4)")
    reply, _, errors = run(km, "%noyau push side arr")
    assert reply["status"] == "ok", (reply, errors)
    _, text, _ = run(km, "%%noyau on side --quiet\nprint(arr.shape, arr.dtype, arr.sum())\narr2 = arr * 2")
    assert text == "(3, 4) float64 66.0\n", text
    reply, _, errors = run(km, "%noyau pull side arr2")
    assert reply["status"] == "ok", (reply, errors)
    _, text, _ = run(km, "print(type(arr2).__name__, (arr2 == arr * 2).all())")
    assert text == "ndarray True\n", text


def test_idle_target_is_released(noyau_kernelspec: str, tmp_path: Path) -> None:
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    global _tag
    _tag = f"targets-idle-{tmp_path.name}"
    m = lib.kernel_in(noyau_kernelspec, tmp_path, {"NOYAU_TEST_TAG": _tag, "NOYAU_TARGET_IDLE": "1"})
    _proxies[:] = [m.provisioner.process.pid]
    try:
        before = agents()
        run(m, "%%noyau on side\nx = 1")
        started = agents() - before
        assert len(started) == 1
        # The proxy checks idleness every 5 s (idle::CHECK_EVERY); the target was idle for 1 s.
        lib.wait_until(lambda: not (started & agents()), 30, "the idle target's agent to end")
        # Listed as releasing until the proxy has seen its job end.
        _, text, _ = run(m, "%noyau targets")
        assert "no targets" in text or "releasing" in text, text
        lib.wait_until(lambda: "no targets" in run(m, "%noyau targets")[1], 10, "the released target to leave the list")
    finally:
        lib.stop_kernel(m)


def test_push_and_pull_variables(km) -> None:  # type: ignore[no-untyped-def]
    run(km, "data = {'a': [1, 2, 3], 'name': 'é'}\nscale = 10")
    run(km, "%%noyau on side --quiet\nready = True")
    reply, text, errors = run(km, "%noyau push side data scale")
    assert reply["status"] == "ok", (reply, errors)
    assert "pushed data, scale to target side" in text, text
    reply, text, _ = run(km, "%%noyau on side --quiet\nresult = [x * scale for x in data['a']]\nprint(data['name'], result)")
    assert text == "é [10, 20, 30]\n", text
    reply, text, errors = run(km, "%noyau pull side result")
    assert reply["status"] == "ok", (reply, errors)
    reply, text, _ = run(km, "print(result)")
    assert text == "[10, 20, 30]\n"
    reply, _, _ = run(km, "%noyau pull side nothing_here")
    assert reply["status"] == "error" and "NameError" in reply["evalue"], reply
    reply, _, _ = run(km, "%noyau push side 'x; import os'")
    assert reply["status"] == "error" and "variable name" in reply["evalue"], reply


def test_a_target_may_run_another_kernelspec(km, prefix: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    spec = lib.read_kernelspec(prefix, lib.DIRECT_KERNEL_NAME)
    spec["env"] = {"WHICH_KERNEL": "the other one"}
    d = prefix / "share" / "jupyter" / "kernels" / "python3-other"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    reply, text, _ = run(km, "%%noyau on other --quiet\nimport os\nprint(os.environ.get('WHICH_KERNEL'))")
    assert reply["status"] == "ok" and text == "the other one\n", (reply, text)
    _, text, _ = run(km, "import os\nprint(os.environ.get('WHICH_KERNEL'))")
    assert text == "None\n"


def test_tasks_fan_out_with_outputs_grouped_by_task(km) -> None:  # type: ignore[no-untyped-def]
    reply, text, _ = run(km, "%%noyau on side --quiet --tasks 3\nimport os\n"
                             "print('I am', os.environ['NOYAU_TASK_ID'], 'of', os.environ['NOYAU_NTASKS'])")
    assert reply["status"] == "ok", reply
    assert text == "".join(f"--- task {i} ---\nI am {i} of 3\n" for i in range(3)), text
    reply, _, _ = run(km, "%%noyau on side --quiet --tasks 2\nimport os, sys\nsys.exit(int(os.environ['NOYAU_TASK_ID']))")
    assert reply["status"] == "error" and "task 1 exited 1" in reply["evalue"], reply
    body, hidden = lib.tasks_hide_their_body()
    reply, text, _ = run(km, f"%%noyau on side --quiet --tasks 2\n{body}")
    assert reply["status"] == "ok" and text == f"--- task 0 ---\n{hidden}\n--- task 1 ---\n{hidden}\n", text
    reply, text, _ = run(km, "%%noyau on side --quiet --tasks 1\nx = 1\nraise ValueError('in the cell')")
    assert reply["status"] == "error", reply
    assert '  File "<cell>", line 2, in <module>\n    raise ValueError(\'in the cell\')\n' in text, text


def test_tasks_run_as_srun_steps_in_a_slurm_allocation(km) -> None:  # type: ignore[no-untyped-def]
    lib.require_slurm()
    reply, text, _ = run(km, "%%noyau on test --quiet --tasks 2\nimport os\n"
                             "print(os.environ['NOYAU_TASK_ID'], os.environ.get('SLURM_STEP_ID'), os.environ['SLURM_JOB_ID'])",
                         timeout=180)
    assert reply["status"] == "ok", (reply, text)
    lines = text.splitlines()
    assert lines[0] == "--- task 0 ---" and lines[2] == "--- task 1 ---", text
    t0, t1 = lines[1].split(), lines[3].split()
    assert t0[0] == "0" and t1[0] == "1", text
    assert t0[1] == t1[1] != "None", "both tasks must be one srun step"
    assert t0[2] == t1[2], "both tasks must be in the target's one job"
    # srun's own command line (the step's SubmitLine) runs on the same host
    body, hidden = lib.tasks_hide_their_body()
    reply, text, _ = run(km, f"%%noyau on test --quiet --tasks 2\n{body}", timeout=180)
    assert reply["status"] == "ok" and text == f"--- task 0 ---\n{hidden}\n--- task 1 ---\n{hidden}\n", text


def test_an_interrupted_tasks_cell_ends_its_slurm_step(km, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An interrupted `--tasks` cell on a Slurm target answers
    KeyboardInterrupt and ends its srun step and its tasks (one SIGINT only
    makes srun report its tasks' status): a step left running would hold
    the job's cores, and the next cell's srun would wait for them."""
    lib.require_slurm()
    reply, text, _ = run(km, "%%noyau on test --quiet --tasks 2\nimport os\nprint(os.environ['SLURM_JOB_ID'])",
                         timeout=180)
    assert reply["status"] == "ok", (reply, text)
    job = text.splitlines()[1]

    def steps() -> set[str]:
        """The job's steps as squeue lists them (with its batch step, and
        the previous cell's if it is still ending)."""
        out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True,
                             check=True, timeout=30)
        return set(out.stdout.split())

    before = steps()
    # Each task leaves its pid here once it runs the body (which it reads
    # from srun once the kernel has handed srun all of it).
    started = tmp_path / "started"
    started.mkdir()
    body = f"import os, pathlib, time\npathlib.Path({str(started)!r}, str(os.getpid())).touch()\ntime.sleep(600)"
    msg_id = km.kc.execute(f"%%noyau on test --quiet --tasks 2\n{body}")

    def running() -> tuple[set[str], set[int]] | None:
        tasks = {int(p.name) for p in started.iterdir()}
        new = steps() - before
        return (new, tasks) if len(tasks) == 2 and new else None

    new, tasks = lib.wait_until(running, 120, "the cell's two tasks in a new step", interval=0.2)
    assert all(lib.alive(p) for p in tasks), tasks
    km.interrupt_kernel()
    while (r := km.kc.get_shell_msg(timeout=120))["parent_header"].get("msg_id") != msg_id:
        pass
    assert r["content"]["status"] == "error" and r["content"]["ename"] == "KeyboardInterrupt", r["content"]
    lib.wait_until(lambda: not (steps() & new) and not any(lib.alive(p) for p in tasks), 60,
                   f"the interrupted cell's step {sorted(new)} and its tasks {sorted(tasks)} to end", interval=0.2)
    # The job's cores are free for the next cell's step.
    reply, text, _ = run(km, "%%noyau on test --quiet --tasks 2\nprint('again')", timeout=120)
    assert reply["status"] == "ok" and text == "--- task 0 ---\nagain\n--- task 1 ---\nagain\n", (reply, text)


def test_idle_slurm_target_leaves_the_queue(noyau_kernelspec: str, tmp_path: Path) -> None:
    lib.require_slurm()
    global _tag
    _tag = f"targets-idle-slurm-{tmp_path.name}"
    m = lib.kernel_in(noyau_kernelspec, tmp_path, {"NOYAU_TEST_TAG": _tag, "NOYAU_TARGET_IDLE": "1"})
    try:
        reply, text, _ = run(m, "%%noyau on test\nimport os\nprint('job', os.environ['SLURM_JOB_ID'])", timeout=120)
        assert reply["status"] == "ok", reply
        job = next(line.split()[1] for line in text.splitlines() if line.startswith("job "))
        lib.wait_until(lambda: not any(j["id"] == job for j in lib.squeue_noyau()), 40,
                       "the idle target's job to leave the queue", interval=0.5)
    finally:
        lib.stop_kernel(m)
