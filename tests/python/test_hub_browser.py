"""The hub in a real browser: Debian's headless Chromium, driven by
playwright-core (tests/browser/hub.mjs), against the hub, real Slurm and real
JupyterLab. Screenshots of every step land in target/test-logs/hub-browser/.

The node is filled first (a blocker job in partition `batch`), so the
session, asked for in `batch`, visibly queues; the test releases the node
once the page has shown the queued card. The hub has a site name, a logo and
a message of the day, and the user five ended sessions (rows of the hub's
database), so the pages show the history folded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import browser_testlib as bt
import hub_testlib as hl
import noyau_testlib as lib

BROWSER = bt.BROWSER
SHOTS = bt.ROOT / "target" / "test-logs" / "hub-browser"


def test_browser_login_spawn_queued_running_lab_cell_cancel(tmp_path: Path, slurm) -> None:  # type: ignore[no-untyped-def]
    hl.require_hub_env()
    bt.require_browser()
    bt.require_labextension(hl.JUPYTER_VENV)
    user = hl.UnixUser("nhw")
    (tmp_path / "hub").mkdir()
    logo = tmp_path / "logo.svg"
    logo.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48" viewBox="0 0 48 48">'
                    '<rect width="48" height="48" rx="10" fill="#fff"/><circle cx="24" cy="24" r="12" fill="#1f3a5f"/>'
                    '<circle cx="24" cy="24" r="5" fill="#f0a202"/></svg>')
    hub = hl.Hub(tmp_path / "hub", admins=[], extra=f'site_name = "Centre de calcul de test"\nlogo = "{logo}"\n'
                 'motd = "Maintenance on Tuesday from 8:00: sessions running then will end."\n')
    blocker = None
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    proc = None
    try:
        hub.start()
        for i in range(5):
            hub.add_ended_session(f"past{i}", user.name, "/nonexistent.log", ago=3600 * (i + 1),
                                  why="reached its walltime" if i % 2 else "cancelled")
        blocker = lib.fill_the_node()
        env = dict(os.environ, HUB_URL=hub.url, HUB_USER=user.name, HUB_PASSWORD=user.password,
                   SHOTS_DIR=str(SHOTS), PARTITION="batch", PROFILE_DIR=str(tmp_path / "chromium-profile"))
        proc = subprocess.Popen(["node", str(BROWSER / "hub.mjs")], stdout=subprocess.PIPE, text=True, env=env,
                                cwd=BROWSER)
        steps: list[dict] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            steps.append(json.loads(line))
            if "error" in steps[-1]:
                break
            if steps[-1]["step"] == "03-queued":
                # The page showed the queued card: free the node.
                subprocess.run(["scancel", blocker], check=True)
                blocker = None
        rc = proc.wait(60)
        errors = [s["error"] for s in steps if "error" in s]
        assert rc == 0 and not errors, f"browser scenario failed: {errors} (screenshots in {SHOTS}; hub log {hub.log})"
        by_step = {s["step"]: s for s in steps}
        home = by_step["home"]
        assert home["title"] == "Interactive sessions · Centre de calcul de test", home
        assert home["motd"].startswith("Maintenance on Tuesday") and home["logoWidth"] == 48, home
        # Only the partitions the profiles offer (the cluster also has `urgent`).
        assert sorted(home["partitions"]) == ["batch", "debug"], home
        assert not home["formDisabled"] and by_step["spawned"]["formDisabled"]
        assert "Queued" in by_step["queued"]["text"] and "Resources" in by_step["queued"]["text"]
        notes = by_step["notifications"]["notes"]
        # The session starting, and (10 minutes asked for) less than 10 minutes left.
        assert any(n.startswith("Your session is running") for n in notes), notes
        assert any("(walltime)" in n for n in notes), notes
        assert by_step["cell"]["output"].strip() == "42"
        # JupyterLab's "Hub" menu (noyau's extension) leads home and logs out.
        assert by_step["hub-home"]["url"] == f"{hub.url}/hub/home", by_step["hub-home"]
        logout_page = by_step["logout-page"]
        assert logout_page["url"] == f"{hub.url}/hub/logout" and logout_page["signedIn"], logout_page
        assert by_step["logged-out"]["url"].startswith(f"{hub.url}/hub/login"), by_step["logged-out"]
        # Cancel asked first, and the question outlived a refresh of the cards.
        assert by_step["confirm"] == dict(by_step["confirm"], visible=True, state="running"), by_step["confirm"]
        ended = by_step["ended"]
        assert "Ended: cancelled" in ended["text"] and not ended["formDisabled"], ended
        # The log tail is shown, without Slurm's own notice of the cancel.
        assert "CANCELLED" not in ended["text"], ended["text"]
        assert by_step["history"] == dict(by_step["history"], shown=3, folded=3), by_step["history"]
        lines = by_step["lines"]["lines"]
        assert any(line.startswith("Running on ") and line.endswith(" left") for line in lines), lines
        assert not [line for line in lines if "?" in line or "1 cores" in line], lines
        for name in ("01-wrong-password", "02-home", "03-queued", "04-running", "05-jupyterlab", "06-cell-ran",
                     "06b-hub-menu", "06c-hub-logout", "07a-cancel-confirm", "07-cancelled", "08-history",
                     "09-phone"):
            assert (SHOTS / f"{name}.png").stat().st_size > 1000, name
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        if blocker:
            subprocess.run(["scancel", blocker], check=False)
        hub.close()
        user.remove()
