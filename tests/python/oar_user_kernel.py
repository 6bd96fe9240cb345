"""Kernelspec launcher of `noyau-oar-python3` (the OAR kernel tests):
jupyter_client, running as root, starts this with its connection file; OAR
runs no job of root's, so it gives a copy of that file to the OAR test user
and becomes, in the same process (exec: a SIGKILL from a test reaches the
proxy itself), `noyau kernel --backend oar` as that user, with a clean
environment but for noyau's own variables and the test session's markers.
test_comm's Slurm extend refusal runs it with another backend and profile
(`SLURM_CONF` then kept: the test cluster's).

    oar_user_kernel.py CONNECTION_FILE USER [BACKEND PROFILE]
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

conn, user = Path(sys.argv[1]), sys.argv[2]
backend, profile = (sys.argv[3], ["--profile", sys.argv[4]]) if len(sys.argv) > 4 else ("oar", [])
pw = pwd.getpwnam(user)
home = Path(pw.pw_dir)
# the same copy for the same file: a restart's next proxy finds the handover
runtime = home / "noyau-test-runtime"
runtime.mkdir(mode=0o700, exist_ok=True)
os.chown(runtime, pw.pw_uid, pw.pw_gid)
copy = runtime / conn.name
shutil.copyfile(conn, copy)
os.chown(copy, pw.pw_uid, pw.pw_gid)
os.chmod(copy, 0o600)

env = {k: v for k, v in os.environ.items()
       if (k.startswith("NOYAU_") and k not in ("NOYAU_BIN",)) or k == "SLURM_CONF"}
env.update({"HOME": str(home), "USER": user, "LOGNAME": user, "LANG": "C.UTF-8",
            "PATH": f"{home}/noyau-test-venv/bin:/usr/local/bin:/usr/bin:/bin"})
env.setdefault("NOYAU_OAR_POLL", "0.5")
os.chdir(home)
os.setgroups(os.getgrouplist(user, pw.pw_gid))
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)
noyau = str(home / "noyau")
os.execve(noyau, [noyau, "kernel", "-f", str(copy), "--inner", "python3", "--backend", backend, *profile],
          env)
