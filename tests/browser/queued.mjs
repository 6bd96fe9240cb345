// A queued kernel as JupyterLab shows it (tests/python/test_queued_lab.py):
// open a notebook whose noyau kernel's job waits in the queue, read the
// kernel status in Lab's status bar (Idle, not Unknown), run a cell, and
// time how long the status bar takes to read Busy. Screenshots go to
// $SHOTS_DIR; one JSON line per step on stdout.
//
// Environment: LAB_URL (…/lab), NOTEBOOK, SHOTS_DIR, PROFILE_DIR, CHROMIUM.
import { env, launch, step } from "./common.mjs";
import path from "node:path";

const lab = env("LAB_URL"), notebook = env("NOTEBOOK"), shots = env("SHOTS_DIR");
const context = await launch({ width: 1200, height: 800 });
const consoleLines = [];
// Lab's kernel status item: "Python 3 (noyau slurm) | Idle".
const kernelState = (page, state) =>
  page.locator(".jp-StatusBar-TextItem", { hasText: `| ${state}` }).first();

try {
  const page = context.pages()[0] ?? await context.newPage();
  page.on("console", (m) => { if (["error", "warning"].includes(m.type())) consoleLines.push(`${m.type()}: ${m.text()}`); });
  await page.goto(`${lab}/tree/${notebook}`);
  await page.locator(".jp-Notebook .jp-Cell .cm-content").first().waitFor({ timeout: 120000 });
  await kernelState(page, "Idle").waitFor({ timeout: 60000 });
  step("idle");
  await page.screenshot({ path: path.join(shots, "01-idle.png") });
  const editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").last();
  await editor.click();
  await page.keyboard.type("print('ran after the queue')");
  const t0 = Date.now();
  await page.keyboard.press("Shift+Enter");
  await kernelState(page, "Busy").waitFor({ timeout: 30000 });
  step("busy", { after_ms: Date.now() - t0 });
  await page.screenshot({ path: path.join(shots, "02-busy.png") });
} catch (e) {
  console.log(JSON.stringify({ error: String(e), console: consoleLines }));
  process.exitCode = 1;
} finally {
  await context.close();
}
