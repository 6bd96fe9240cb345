"""The sudo form of `submit_as`, for real: a hub that runs as a non-root
service account made by the test, with the sudoers rule of docs/hub.md
(read from that file, so the documentation is what is tested), submits a
session's Slurm or OAR job as the user, the session reaches Running, a cell runs in
it through the hub, and cancel goes through sudo too; a command outside the
rule is refused, and so are the rule's own commands as the scheduler's
accounts (`slurm`, `oar`), as root, and as a user outside the hub's group.

Logins use the trusted-header mode: PAM's pam_unix reads /etc/shadow, which
only root can (docs/hub.md says so), so a non-root hub cannot check
passwords here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import hub_testlib as hl

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hub.md"


def sudoers_rule(scheduler: str, account: str, group: str, noyau: Path) -> str:
    """The rule docs/hub.md gives (its first ```sudoers block for Slurm, the
    second for OAR), for the hub's account `account`, the hub users' group
    `group` and its noyau."""
    blocks = re.findall(r"```sudoers\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 2, "docs/hub.md should give a sudoers block for Slurm and one for OAR"
    rule = blocks[0 if scheduler == "slurm" else 1]
    assert "%noyau-users" in rule, rule
    return "\n".join(line.strip() for line in rule.splitlines()).replace("noyauhub", account) \
        .replace("%noyau-users", f"%{group}").replace("/usr/bin/noyau ", f"{noyau} ")


def require_sudo() -> None:
    if not shutil.which("sudo") or not shutil.which("visudo"):
        msg = "no sudo (scripts/test installs Debian's sudo)"
        if os.environ.get("CI") or os.environ.get("NOYAU_TEST_SLURM"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def run_non_root_hub(scheduler: str, queue: str, mem_gb: int, job_user_of) -> None:  # type: ignore[no-untyped-def]
    """A session through a hub running as a service account with sudo."""
    import requests

    group = f"nhg{os.urandom(3).hex()}"
    subprocess.run(["groupadd", group], check=True)
    svc, u, outsider = hl.UnixUser("nhsvc"), hl.UnixUser("nhsu", groups=[group]), hl.UnixUser("nhso")
    work = Path(tempfile.mkdtemp(prefix="noyau-hub-sudo-"))
    rule = Path(f"/etc/sudoers.d/noyau-hub-test-{svc.name}")
    hub = None
    try:
        hub = hl.Hub(work, admins=[], auth="header", scheduler=scheduler,
                     submit_as=["sudo", "-n", "-u", "{user}", "--"], run_as=svc.name)
        rule.write_text(sudoers_rule(scheduler, svc.name, group, hub.noyau))
        rule.chmod(0o440)
        check = subprocess.run(["visudo", "-c", "-f", str(rule)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        subprocess.run(["chown", "-R", svc.name, str(work)], check=True)
        hub.start()
        assert subprocess.run(["ps", "-o", "user=", "-p", str(hub.proc.pid)], capture_output=True,
                              text=True).stdout.strip() == svc.name

        s = requests.Session()
        s.headers.update(hub.as_user(u.name))
        csrf = hl.csrf_of(s.get(hub.url + "/hub/home").text)
        r = s.post(hub.url + "/hub/spawn", data={"_csrf": csrf, "profile": "cpu", "partition": queue, "cores": 1,
                                                 "mem_gb": mem_gb, "gpus": 0, "minutes": 10})
        assert r.status_code == 200, r.text[:500]
        st = hl.wait_state(s, hub.url, "running", timeout=180)
        assert job_user_of(st["job_id"]) == u.name
        assert hl.run_cell(s, hub.url, u.name, "6 * 7") == "42"

        # The rule lets the hub's account run nothing else as the user, nor anything as root.
        def as_svc(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(["runuser", "-u", svc.name, "--", "sudo", "-n", *argv], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)

        for argv in (["-u", u.name, "--", "id"], ["-u", u.name, "--", "sbatch", "--wrap", "id"],
                     ["-u", u.name, "--", "oarsub", "id"], ["-u", "root", "--", str(hub.noyau), "hub-submit"],
                     ["-u", "root", "--", "sbatch", "--parsable"]):
            r = as_svc(*argv)
            assert r.returncode != 0 and "sudo:" in r.stderr, (argv, r.returncode, r.stderr)
        # Nor the rule's own commands as the scheduler's accounts, root, or a
        # user outside the group (`sudo -l -U`: what the rule allows, run nothing).
        allowed = [str(hub.noyau), "hub-submit"]

        def may_run_as(user: str) -> bool:
            return subprocess.run(["sudo", "-n", "-l", "-U", svc.name, "-u", user, *allowed],
                                  capture_output=True, text=True).returncode == 0

        assert may_run_as(u.name)
        for system in ("slurm", "oar"):
            assert subprocess.run(["id", system], capture_output=True).returncode == 0, \
                f"no {system} account (Debian's {system} packages make it)"
        for other in ("slurm", "oar", "root", outsider.name):
            assert not may_run_as(other), f"the documented rule lets {svc.name} run {allowed} as {other}"
            r = as_svc("-u", other, "--", *allowed)
            assert r.returncode != 0 and "sudo:" in r.stderr, (other, r.returncode, r.stderr)

        # Cancel goes through sudo as well (scancel or oardel as the user).
        hl.cancel_until_ended(s, hub.url, csrf, st)
    finally:
        if hub:
            hub.close()
        rule.unlink(missing_ok=True)
        u.remove()
        outsider.remove()
        svc.remove()
        subprocess.run(["groupdel", group], check=False)
        shutil.rmtree(work, ignore_errors=True)


def test_sudo_submit_as_from_a_non_root_hub(slurm) -> None:  # type: ignore[no-untyped-def]
    hl.require_hub_env()
    require_sudo()

    def job_user(job: str) -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%u"], capture_output=True, text=True,
                              check=True).stdout.strip()

    run_non_root_hub("slurm", "debug", 1, job_user)


def test_sudo_submit_as_from_a_non_root_hub_on_oar() -> None:
    hl.require_hub_oar_env()
    require_sudo()

    def job_user(job: str) -> str:
        out = subprocess.run(["oarstat", "-J", "-f", "-j", job], capture_output=True, text=True, check=True).stdout
        return json.loads(out)[job]["job_user"]

    run_non_root_hub("oar", "default", 0, job_user)
