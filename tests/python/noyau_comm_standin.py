"""STAND-IN for the kernel side of the `noyau` comm (docs/comm.md).

The noyau proxy speaks the comm itself (noyau-proxy's comm/), and the
JupyterLab extension's browser test (test_labext_browser.py) drives a real
noyau kernel on the test Slurm and OAR. This stand-in serves what those
cannot give on this machine: a GPU, the scheduler's estimated start, an idle
release with a date. It is a real ipykernel that loads this module at start (`--IPKernelApp.exec_lines=__import__('noyau_comm_standin')`,
see test_labext_browser.StandInCommKernel) and
registers a `noyau` comm target answering as the protocol says, from a
*scene* the test writes as JSON to $NOYAU_STANDIN_SCENE: the job (queued,
running, its walltime), targets, Dask jobs, what the kernel allows. What a
scene cannot fake is real: the kernel process's memory and CPU use (read
from /proc/self, `source: "process-tree"`), so a cell that allocates
200 MB shows in the panel as it will with the real kernel.

Requests from the frontend change the stand-in's copy of the scene as the
real kernel's would change the allocation (extend moves `ends_at`, release
drops the target, cancel ends the worker job) and are answered with one
`reply` each. Every comm the frontend opens is recorded as a file in
$NOYAU_STANDIN_OPENED (named after this process's pid), so the test sees the
comm reopened by a new kernel process after a restart.

Scene keys (all optional): job (as in docs/comm.md, plus `ends_in_s` and
`estimated_start_in_s`, made absolute when the scene is read), backend,
resources, usage_gpus (GPUs' use, made up: there is no GPU here), targets,
dask, can, idle, log (the log tail's text),
extend_refusal (an `ok: false` message for extend), interval (seconds
between states).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import comm as _comm

SCENE = os.environ.get("NOYAU_STANDIN_SCENE", "")
OPENED = os.environ.get("NOYAU_STANDIN_OPENED", "")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class StandIn:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.comms: list = []
        self.scene: dict = {}
        self.scene_mtime = 0.0
        self.cpu_mark = (time.monotonic(), self._cpu_seconds())
        self.cpu_percent: float | None = None
        self.load_scene()

    # -- the scene ----------------------------------------------------------

    def load_scene(self) -> bool:
        """Reads the scene file if it changed; True when it did."""
        try:
            mtime = os.stat(SCENE).st_mtime
            if mtime == self.scene_mtime:
                return False
            with open(SCENE) as f:
                scene = json.load(f)
        except (OSError, ValueError):
            return False
        job = scene.get("job")
        if job:
            for rel, key in (("ends_in_s", "ends_at"), ("estimated_start_in_s", "estimated_start")):
                if rel in job:
                    job[key] = _iso(_now() + timedelta(seconds=job.pop(rel)))
        with self.lock:
            self.scene = scene
            self.scene_mtime = mtime
        return True

    # -- what the kernel measures --------------------------------------------

    @staticmethod
    def _cpu_seconds() -> float:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def sample(self) -> None:
        t, cpu = time.monotonic(), self._cpu_seconds()
        t0, cpu0 = self.cpu_mark
        if t - t0 >= 0.5:
            self.cpu_percent = round(100 * (cpu - cpu0) / (t - t0), 1)
            self.cpu_mark = (t, cpu)

    def usage(self) -> dict:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
        res = self.scene.get("resources") or {}
        return {
            "at": _iso(_now()),
            "cpu_percent": self.cpu_percent if self.cpu_percent is not None else 0.0,
            "mem_bytes": rss,
            "mem_limit_bytes": res.get("mem_bytes"),
            "source": "process-tree",
            # No GPU here: a scene may name stand-in ones.
            "gpus": self.scene.get("usage_gpus", []),
        }

    def state(self) -> dict:
        s = self.scene
        return {
            "type": "state",
            "version": 1,
            "backend": s.get("backend", "slurm"),
            "now": _iso(_now()),
            "job": s.get("job"),
            "resources": s.get("resources"),
            # A queued job has no processes to sample yet.
            "usage": None if (s.get("job") or {}).get("state") == "pending" else self.usage(),
            "targets": s.get("targets", []),
            "dask": s.get("dask"),
            "can": s.get("can", {}),
            "idle": s.get("idle"),
        }

    # -- the comm ----------------------------------------------------------------

    def broadcast(self) -> None:
        with self.lock:
            msg = self.state()
            comms = list(self.comms)
        for c in comms:
            c.send(msg)

    def on_open(self, c, msg) -> None:  # noqa: ANN001
        with self.lock:
            self.comms.append(c)
        if OPENED:
            path = os.path.join(OPENED, f"{os.getpid()}-{c.comm_id}")
            with open(path, "w") as f:
                json.dump(msg["content"]["data"], f)
        c.on_msg(lambda m: self.on_request(c, m["content"]["data"]))
        c.on_close(lambda _m: self.forget(c))
        c.send(self.state())

    def forget(self, c) -> None:  # noqa: ANN001
        with self.lock:
            if c in self.comms:
                self.comms.remove(c)

    def on_request(self, c, req: dict) -> None:  # noqa: ANN001
        rid = req.get("id")
        action = req.get("action")
        handler = getattr(self, f"do_{action}", None)
        if handler is None:
            ok, message = False, f"unknown action {action!r}"
        else:
            with self.lock:
                ok, message = handler(c, req)
        c.send({"type": "reply", "request": rid, "ok": ok, "message": message})
        if ok:
            self.broadcast()

    def do_refresh(self, c, req):  # noqa: ANN001, ANN201
        return True, "refreshed"

    def do_extend(self, c, req):  # noqa: ANN001, ANN201
        job = self.scene.get("job") or {}
        refusal = self.scene.get("extend_refusal")
        if refusal or not self.scene.get("can", {}).get("extend"):
            return False, refusal or "this scheduler does not let users extend a job"
        m = re.fullmatch(r"(\d+):(\d\d):(\d\d)", str(req.get("duration", "")))
        if not m or not job.get("ends_at"):
            return False, f"cannot extend by {req.get('duration')!r}"
        secs = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        ends = datetime.fromisoformat(job["ends_at"].replace("Z", "+00:00"))
        job["ends_at"] = _iso(ends + timedelta(seconds=secs))
        return True, f"walltime of job {job.get('id')} extended by {req['duration']} (stand-in)"

    def do_release(self, c, req):  # noqa: ANN001, ANN201
        name = req.get("target")
        targets = self.scene.get("targets", [])
        gone = [t for t in targets if t.get("name") == name]
        if not gone:
            return False, f"this kernel has no target {name!r}"
        self.scene["targets"] = [t for t in targets if t.get("name") != name]
        return True, f"released target {name}: job {gone[0].get('job')} ended (stand-in)"

    def do_cancel(self, c, req):  # noqa: ANN001, ANN201
        jid = req.get("job")
        for j in (self.scene.get("dask") or {}).get("jobs", []):
            if j.get("id") == jid and j.get("role") == "worker":
                j["state"] = "ended"
                self.scene["dask"]["workers"] = max(0, self.scene["dask"].get("workers", 1) - 1)
                return True, f"cancelled worker job {jid} (stand-in)"
        return False, f"job {jid} is not a Dask worker of this kernel"

    def do_log(self, c, req):  # noqa: ANN001, ANN201
        job = req.get("job") or (self.scene.get("job") or {}).get("id")
        text = self.scene.get("log", f"(stand-in) log of job {job}\n")
        c.send({"type": "log", "request": req.get("id"), "text": text.replace("{job}", str(job))})
        return True, f"log of job {job}"

    # -- the updates -----------------------------------------------------------

    def run(self) -> None:
        """Sends a state whenever the scene changes and every `interval` s."""
        last = 0.0
        while True:
            time.sleep(0.2)
            self.sample()
            changed = self.load_scene()
            interval = float(self.scene.get("interval", 5))
            if changed or time.monotonic() - last >= interval:
                last = time.monotonic()
                try:
                    self.broadcast()
                except Exception:  # noqa: BLE001 (a comm closing under us: the next round)
                    pass


_standin = StandIn()
_comm.get_comm_manager().register_target("noyau", _standin.on_open)
threading.Thread(target=_standin.run, name="noyau-standin", daemon=True).start()
