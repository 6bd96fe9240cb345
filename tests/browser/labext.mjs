// The JupyterLab extension's browser scenario (tests/python/test_labext_browser.py),
// in Debian's headless Chromium driven by playwright-core: open a notebook
// whose kernel speaks the `noyau` comm, read the status bar and the panel,
// use every button, restart the kernel, switch to a notebook on a plain
// kernel, change its kernel to the comm kernel, and go back. A screenshot of each step goes to $SHOTS_DIR.
//
// One JSON line per step goes to stdout. A step {"step": "need", "what": W}
// asks the Python test to change the world (the job starts running, the
// walltime nears…); the script goes on when the test writes a line on stdin.
//
// Environment: LAB_URL (…/lab), NOTEBOOK, PLAIN_NOTEBOOK, KERNEL_DISPLAY_NAME
// (the comm kernel's, to change the plain notebook's kernel to), SHOTS_DIR,
// PROFILE_DIR (a fresh directory), CHROMIUM (default /usr/bin/chromium),
// KERNEL: `real` (a noyau kernel on the test Slurm: a target and a Dask
// cluster are started from cells; root, a Slurm operator, is offered the
// extend button), `oar` (a noyau
// kernel on the test OAR: only the extend, which OAR grants) or `standin`
// (the stand-in kernel's scenes).
import { env, launch, step } from "./common.mjs";
import path from "node:path";
import readline from "node:readline";

const lab = env("LAB_URL"), notebook = env("NOTEBOOK"), plain = env("PLAIN_NOTEBOOK");
const shots = env("SHOTS_DIR");
const real = env("KERNEL") === "real";

// Lines from the test, one per "need".
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const need = async (what) => {
  step("need", { what });
  const { value, done } = await lines.next();
  if (done || value.trim() !== "go") throw new Error(`the test did not provide ${what}: ${value}`);
};

const context = await launch({ width: 1400, height: 860 });
const consoleLines = [];
const shot = async (page, name) => {
  await page.screenshot({ path: path.join(shots, `${name}.png`) });
  step(name);
};

const status = (page) => page.locator(".noyau-StatusItem");
const statusText = async (page) => (await status(page).innerText()).trim();
const panel = (page) => page.locator("#noyau-allocation");
const fact = (page, name) => panel(page).locator(`dd[data-fact="${name}"]`);
const meterText = (page, name) => panel(page).locator(`[data-meter="${name}"] .noyau-Meter-text`).innerText();
// `1:02:03` (in a longer text) in seconds.
const clock = (text) => {
  const m = /(\d+):(\d\d):(\d\d)/.exec(text);
  return m ? Number(m[1]) * 3600 + Number(m[2]) * 60 + Number(m[3]) : NaN;
};
const bytes = (text) => {
  const m = /([\d.]+) (B|KiB|MiB|GiB|TiB)/.exec(text);
  return m ? Number(m[1]) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].indexOf(m[2]) : NaN;
};
// Polls `f` until it returns a truthy value (playwright's own polling, with a deadline).
const until = async (page, what, f, timeout = 60000) => {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await page.waitForTimeout(250);
  }
};

const kernelIdle = (page) =>
  page.locator(".jp-StatusBar-TextItem", { hasText: "| Idle" }).first().waitFor({ timeout: 120000 });

const runCell = async (page, code) => {
  const editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").last();
  await editor.click();
  await page.keyboard.type(code);
  await page.keyboard.press("Shift+Enter");
};

// Clicks a panel button and answers the dialog it opens; returns the reply shown.
const act = async (page, button, { input, accept } = {}) => {
  const replyLine = panel(page).locator(".noyau-Panel-reply");
  const before = (await replyLine.count()) ? await replyLine.innerText() : "";
  await button.click();
  if (input !== undefined || accept) {
    const dialog = page.locator(".jp-Dialog");
    await dialog.waitFor();
    if (input !== undefined) await dialog.locator("input").fill(input);
    if (accept) await shot(page, accept);
    await dialog.locator(".jp-mod-accept").click();
  }
  return until(page, "the reply", async () => {
    if (!(await replyLine.count())) return null;
    const text = (await replyLine.innerText()).trim();
    const cls = await replyLine.getAttribute("class");
    return text && text !== before ? { text, ok: cls.includes("noyau-mod-ok") } : null;
  });
};

try {
  const page = context.pages()[0] ?? await context.newPage();
  page.on("console", (m) => { if (["error", "warning"].includes(m.type())) consoleLines.push(`${m.type()}: ${m.text()}`); });
  await page.goto(`${lab}/tree/${notebook}`);
  await page.locator(".jp-Notebook .jp-Cell .cm-content").first().waitFor({ timeout: 120000 });
  await kernelIdle(page);

  // OAR: the extend button adds walltime (oarwalltime) and the time left
  // grows once OAR applied it; nothing else is asked of this kernel.
  if (env("KERNEL") === "oar") {
    await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 180000 });
    await status(page).click();
    await fact(page, "Time left").waitFor({ timeout: 60000 });
    const before = await fact(page, "Time left").innerText();
    await shot(page, "01-oar-running");
    const reply = await act(page, panel(page).locator(".noyau-extend"), { input: "30", accept: "02-oar-extend-dialog" });
    const after = await until(page, "the time left to grow by 30 minutes", async () => {
      const t = await fact(page, "Time left").innerText();
      return clock(t) - clock(before) >= 25 * 60 ? t : null;
    }, 120000);
    step("extend", { reply, before, after, status: await statusText(page) });
    await shot(page, "03-oar-extended");
    step("end", { menus: [], console: consoleLines });
    await context.close();
    process.exit(0);
  }

  // 1. queued: the scheduler's reason and the estimated start
  // (a real job reads "submitted" until the scheduler's first answer)
  const queuedText = real ? /Queued \((Resources|Priority)\)/ : "Queued";
  await status(page).filter({ hasText: queuedText }).waitFor({ timeout: 60000 });
  step("queued", { text: await statusText(page), level: await status(page).getAttribute("data-level") });
  await shot(page, "01-queued");
  await status(page).click();
  await panel(page).locator('[data-section="job"]').waitFor();
  step("queued-panel", { text: await panel(page).innerText() });
  await shot(page, "02-queued-panel");
  await need("running");

  // 2. running on the node, the time left counting down between updates
  await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 180000 });
  const t0 = await statusText(page);
  const t1 = await until(page, "the countdown to move", async () => {
    const t = await statusText(page);
    return t !== t0 ? t : null;
  }, 5000);
  step("running", { text: t0, later: t1, level: await status(page).getAttribute("data-level") });
  await shot(page, "03-running");

  // (a real kernel's target: started by a cell, as a user would)
  if (real) {
    await runCell(page, "%%noyau on side\nimport os; print('target job', os.environ['SLURM_JOB_ID'])");
    await page.locator(".jp-OutputArea-output", { hasText: "target job" }).first().waitFor({ timeout: 180000 });
    await panel(page).locator("[data-target]").first().waitFor({ timeout: 60000 });
  }

  // 3. the panel: resources and use, targets, Dask
  await panel(page).locator('[data-section="resources"] .noyau-Meter').first().waitFor({ timeout: 60000 });
  step("panel", { text: await panel(page).innerText(), sections: await panel(page).locator("section").evaluateAll((s) => s.map((e) => e.dataset.section)) });
  await shot(page, "04-panel");

  // 4. memory rises after a cell allocates 200 MB (refreshing until it shows)
  const memBefore = await meterText(page, "Memory");
  await runCell(page, "x = b'x' * (200 * 1024 * 1024); len(x)");
  await page.locator(".jp-OutputArea-output", { hasText: "209715200" }).first().waitFor({ timeout: 120000 });
  const memAfter = await until(page, "memory use to rise by 200 MB", async () => {
    await panel(page).locator(".noyau-refresh").click();
    await page.waitForTimeout(500);
    const t = await meterText(page, "Memory");
    return bytes(t) - bytes(memBefore) >= 190 * 1024 ** 2 ? t : null;
  }, 90000);
  step("memory", { before: memBefore, after: memAfter });
  await shot(page, "05-memory");

  // 5. extend the walltime by 30 minutes (the stand-in; the real kernel's
  // button: step 9)
  if (!real) {
    const leftBefore = await fact(page, "Time left").innerText();
    const extended = await act(page, panel(page).locator(".noyau-extend"), { input: "30", accept: "06-extend-dialog" });
    const leftAfter = await fact(page, "Time left").innerText();
    step("extend", { reply: extended, before: leftBefore, after: leftAfter, status: await statusText(page) });
    await shot(page, "07-extended");
  }

  // 6. release a target, cancel a worker job: each confirmed first
  const target = panel(page).locator("[data-target]").first();
  const targetName = await target.getAttribute("data-target");
  const released = await act(page, target.locator(".noyau-release"), { accept: "08-release-confirm" });
  await panel(page).locator(`[data-target="${targetName}"]`).waitFor({ state: "detached", timeout: 60000 });
  step("release", { target: targetName, reply: released });
  if (real) {
    await need(`released ${targetName}`); // its job leaves squeue
    // a real Dask cluster on the test Slurm, started by a cell
    await runCell(page, "%noyau dask up 2 --target hpc");
    await page.locator(".jp-OutputArea-output", { hasText: "Dask cluster" }).first().waitFor({ timeout: 180000 });
  }
  const worker = panel(page).locator("[data-dask-job]", { has: page.locator(".noyau-cancel") }).first();
  await worker.waitFor({ timeout: 120000 });
  const workerId = await worker.getAttribute("data-dask-job");
  const cancelled = await act(page, worker.locator(".noyau-cancel"), { accept: "09-cancel-confirm" });
  await until(page, "the worker job to end", async () =>
    !(await panel(page).locator(`[data-dask-job="${workerId}"] .noyau-cancel`).count()));
  step("cancel", { job: workerId, reply: cancelled, dask: await panel(page).locator('[data-section="dask"]').innerText() });
  if (real) {
    await need(`cancelled ${workerId}`); // its job leaves squeue
    // the Dask scheduler job's log tail, from its row. Its Log button shows
    // once the job runs, which is before Dask logged anything (Python is
    // still importing distributed; "Dask cluster" is the cell's first line,
    // printed at submission): the log is shown again, as a person would,
    // until the scheduler's lines are in it.
    const daskLogButton = panel(page).locator("[data-dask-job]", { hasText: "scheduler" })
      .locator('button[title^="Show the log"]');
    const daskLog = panel(page).locator(".noyau-Panel-log");
    let daskLogAsked = 0;
    const daskLogText = await until(page, "the Dask scheduler's log to have its lines", async () => {
      daskLogAsked += 1;
      await daskLogButton.click();
      // (a job whose log file is not there yet gets an error reply, no log)
      if (!(await daskLog.waitFor({ timeout: 15000 }).then(() => true, () => false))) return null;
      const text = await daskLog.innerText();
      await panel(page).locator(".noyau-log-close").click();
      await daskLog.waitFor({ state: "detached" });
      return text.includes("distributed.scheduler") ? text : null;
    }, 120000);
    step("dask-log", { text: daskLogText, asked: daskLogAsked });
    // the node's CPUs are needed for a second kernel later
    await runCell(page, "%noyau dask down");
    await page.locator(".jp-OutputArea-output", { hasText: "Dask cluster down" }).first().waitFor({ timeout: 120000 });
  }
  await shot(page, "10-released-cancelled");

  // 7. the job's log tail, in a scrollable pre
  await panel(page).locator(".noyau-log").click();
  const pre = panel(page).locator(".noyau-Panel-log");
  await pre.waitFor();
  const scroll = await pre.evaluate((e) => ({ overflowY: getComputedStyle(e).overflowY,
    scrollable: e.scrollHeight > e.clientHeight, atEnd: e.scrollTop + e.clientHeight >= e.scrollHeight - 2 }));
  step("log", { text: await pre.innerText(), ...scroll });
  await shot(page, "11-log");
  await panel(page).locator(".noyau-log-close").click();

  // 8. amber at the first warning, red at the last (a real job runs down
  // to the test's thresholds, NOYAU_WALLTIME_WARN, by itself)
  await need("warn");
  await status(page).and(page.locator('[data-level="warn"]')).waitFor({ timeout: 60000 });
  step("warn", { text: await statusText(page), background: await status(page).evaluate((e) => getComputedStyle(e).backgroundColor) });
  await shot(page, "12-amber");
  await need("critical");
  await status(page).and(page.locator('[data-level="critical"]')).waitFor({ timeout: real ? 150000 : 60000 });
  step("critical", { text: await statusText(page), background: await status(page).evaluate((e) => getComputedStyle(e).backgroundColor) });
  await shot(page, "13-red");

  // 9. a request the kernel cannot honour: its message is shown (a real
  // kernel on Slurm run by root, one of its operators, offers the button:
  // counted here; its extension and an ordinary user's refusal: test_comm.py)
  if (real) {
    step("refused", { extendButtons: await panel(page).locator(".noyau-extend").count() });
  } else {
    await need("refuse-extend");
    const refused = await act(page, panel(page).locator(".noyau-extend"), { input: "1:00:00" });
    const toast = await page.locator(".Toastify__toast", { hasText: refused.text.slice(0, 30) }).first()
      .waitFor({ timeout: 10000 }).then(() => true, () => false);
    step("refused", { reply: refused, toast });
    await shot(page, "14-refused");
  }

  // 9b. a kernel whose job was released for idleness reads as a release, not
  // as a failure (the stand-in's scene; the real release: test_idle_release.py)
  if (!real) {
    await need("released-idle");
    await status(page).and(page.locator('[data-level="released"]')).waitFor({ timeout: 30000 });
    step("released-idle", {
      text: await statusText(page),
      color: await status(page).evaluate((e) => getComputedStyle(e).color),
      background: await status(page).evaluate((e) => getComputedStyle(e).backgroundColor),
      state: await fact(page, "State").innerText(),
      idle: await panel(page).locator('[data-section="idle"]').innerText(),
      extendButtons: await panel(page).locator(".noyau-extend").count(),
    });
    await shot(page, "14b-released-idle");
    await need("running");
    await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 30000 });
  }

  // 10. a kernel restart drops the comm; the extension opens it again
  await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Kernel$/ }).click();
  await page.locator(".lm-Menu-itemLabel", { hasText: /^Restart Kernel…$/ }).click();
  await page.locator(".jp-Dialog .jp-mod-accept").click();
  // (the test checks by the kernels' pids that a new kernel process opened a comm)
  await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 120000 });
  step("restarted", { text: await statusText(page) });
  await need("check-reopened");

  // 11. a notebook on a plain kernel: nothing shown; back: the panel follows
  await page.locator(".jp-DirListing-item", { hasText: plain }).dblclick();
  await page.locator(".lm-TabBar-tab.lm-mod-current", { hasText: plain }).first().waitFor();
  await page.locator(".jp-StatusBar-TextItem", { hasText: "| Idle" }).first().waitFor({ timeout: 120000 });
  await panel(page).locator(".noyau-Panel-empty").waitFor();
  step("plain", { statusVisible: await status(page).isVisible(), panel: await panel(page).innerText() });
  await shot(page, "15-plain-notebook");
  // Changing that notebook's kernel to a noyau one opens the comm on it.
  await page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelName").click();
  const chooser = page.locator(".jp-Dialog");
  await chooser.locator("select").selectOption({ label: env("KERNEL_DISPLAY_NAME") });
  await chooser.locator(".jp-mod-accept").click();
  await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 120000 });
  step("changed", { text: await statusText(page), panel: await panel(page).innerText() });
  await shot(page, "15b-kernel-changed");
  await page.locator("#jp-main-dock-panel .lm-TabBar-tab", { hasText: notebook }).first().click();
  await status(page).filter({ hasText: "Running on" }).waitFor({ timeout: 30000 });
  await panel(page).locator('[data-section="job"]').waitFor();
  step("back", { text: await statusText(page), panel: await panel(page).innerText() });
  await shot(page, "16-back");

  const menus = await page.locator("#jp-menu-panel .lm-MenuBar-itemLabel").allInnerTexts();
  step("end", { menus, console: consoleLines });
} catch (e) {
  const page = context.pages()[0];
  if (page) await page.screenshot({ path: path.join(shots, "failure.png") }).catch(() => {});
  console.log(JSON.stringify({ error: String(e && e.stack || e), console: consoleLines }));
  process.exitCode = 1;
} finally {
  await context.close();
  process.exit();
}
