// The hub's browser scenario, in Debian's headless Chromium driven by
// playwright-core (no downloaded browser): log in, fill the spawn form (then
// disabled), see the card go Queued -> Running, open JupyterLab through the
// hub, run a cell, use JupyterLab's "Hub" menu (home, log out), log in again,
// cancel (after its confirmation), open the history, and the home page on a
// phone's screen. A screenshot of each step goes to $SHOTS_DIR; one JSON line
// per step goes to stdout, for the Python test to follow. Every card line the
// page shows is recorded, for the test to check that none is a placeholder.
//
// Environment: HUB_URL, HUB_USER, HUB_PASSWORD, SHOTS_DIR, PARTITION,
// CHROMIUM (default /usr/bin/chromium), PROFILE_DIR (a fresh directory).
import { env, launch, step } from "./common.mjs";
import path from "node:path";

const url = env("HUB_URL"), user = env("HUB_USER"), password = env("HUB_PASSWORD");
const shots = env("SHOTS_DIR"), partition = env("PARTITION", "debug");

const context = await launch({ width: 1280, height: 900 });
const shot = async (page, name) => {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
  step(name);
};
try {
  await context.grantPermissions(["notifications"], { origin: url });
  // Headless Chromium shows no notifications: record what the page asks for.
  await context.addInitScript(() => {
    const Real = window.Notification;
    window.__notes = [];
    window.Notification = function (title, opts) { window.__notes.push((opts && opts.body) || title); };
    window.Notification.permission = Real ? Real.permission : "granted";
    window.Notification.requestPermission = async () => window.Notification.permission;
    // Every card line the pages ever show (the cards are refreshed every 2 s),
    // kept across page loads in the tab's session storage.
    setInterval(() => {
      const lines = JSON.parse(sessionStorage.getItem("lines") || "[]");
      for (const p of document.querySelectorAll(".card[data-session] .state")) {
        const t = p.textContent.trim();
        if (!lines.includes(t)) lines.push(t);
      }
      sessionStorage.setItem("lines", JSON.stringify(lines));
    }, 100);
  });
  const formDisabled = (page) => page.locator("#spawn-cpu fieldset").evaluate((f) => f.disabled);
  const page = context.pages()[0] ?? await context.newPage();

  await page.goto(`${url}/hub/login`);
  await page.fill("#user", user);
  await page.fill("#password", "not-the-password");
  await page.click("#login");
  await page.waitForSelector("#error");
  await shot(page, "01-wrong-password");

  await page.fill("#user", user);
  await page.fill("#password", password);
  await page.click("#login");
  await page.waitForSelector("#who");
  step("home", {
    title: await page.title(),
    motd: await page.locator("#motd").innerText(),
    logoWidth: await page.locator(".brand img").evaluate((i) => i.naturalWidth),
    partitions: await page.locator("#partitions td:first-child").allInnerTexts(),
    formDisabled: await formDisabled(page),
  });
  await shot(page, "02-home");

  await page.selectOption("#partition-cpu", partition);
  await page.fill("#cores-cpu", "1");
  await page.fill("#minutes-cpu", "10");
  await Promise.all([page.waitForNavigation(), page.click("#spawn-cpu button")]);
  step("spawned", { formDisabled: await formDisabled(page) });
  const card = page.locator(".card[data-session]").first();
  // Queued with Slurm's own reason (the watcher's first poll replaces "submitting").
  await page.locator(".card[data-state=queued] .state", { hasNotText: "submitting" }).first()
    .waitFor({ timeout: 60000 });
  step("queued", { text: await card.innerText() });
  await shot(page, "03-queued");

  await page.waitForSelector(".card[data-state=running]", { timeout: 180000 });
  await page.waitForFunction(() => window.__notes.length >= 2, null, { timeout: 10000 }).catch(() => {});
  step("notifications", { notes: await page.evaluate(() => window.__notes) });
  await shot(page, "04-running");

  await page.click("a[id^=open-]");
  await page.waitForSelector(".jp-LauncherCard", { timeout: 120000 });
  await shot(page, "05-jupyterlab");
  await page.click('.jp-LauncherCard[data-category="Notebook"]');
  const editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first();
  await editor.waitFor({ timeout: 60000 });
  // The kernel must be connected and idle before the cell is run.
  await page.locator(".jp-StatusBar-TextItem", { hasText: "| Idle" }).first().waitFor({ timeout: 120000 });
  await editor.click();
  await page.keyboard.type("6 * 7");
  await page.keyboard.press("Shift+Enter");
  const out = page.locator(".jp-OutputArea-output", { hasText: "42" }).first();
  await out.waitFor({ timeout: 120000 });
  step("cell", { output: await out.innerText() });
  await shot(page, "06-cell-ran");

  // The "Hub" menu of noyau's JupyterLab extension (the agent names the hub
  // in Lab's page config): the hub's home in a new tab, then log out.
  const hubMenu = page.locator(".lm-MenuBar-itemLabel", { hasText: /^Hub$/ });
  await hubMenu.click();
  await shot(page, "06b-hub-menu");
  const [home] = await Promise.all([
    context.waitForEvent("page"),
    page.locator(".lm-Menu-itemLabel", { hasText: /^Hub home$/ }).click(),
  ]);
  await home.waitForSelector("#who");
  step("hub-home", { url: home.url() });
  await home.close();
  await hubMenu.click();
  await Promise.all([page.waitForNavigation(),
    page.locator(".lm-Menu-itemLabel", { hasText: /^Log out of the hub$/ }).click()]);
  await page.waitForSelector("#logout");
  // Reaching /hub/logout logged no one out: only its form's POST does.
  step("logout-page", { url: page.url(), signedIn: (await page.locator("#who").count()) === 1 });
  await shot(page, "06c-hub-logout");
  await Promise.all([page.waitForNavigation(), page.click("#logout")]);
  await page.waitForSelector("#login");
  step("logged-out", { url: page.url() });
  await page.fill("#user", user);
  await page.fill("#password", password);
  await page.click("#login");
  await page.waitForSelector("#who");

  await page.goto(`${url}/hub/home`);
  // Cancel asks first (a disclosure, no script needed); the refresh keeps it open.
  await page.click("summary[id^=cancel-]");
  const confirm = page.locator("button[id^=confirm-cancel-]");
  await confirm.waitFor();
  // Two refreshes of the cards later (the first has replaced them), the question is still open.
  for (let i = 0; i < 2; i++) await page.waitForResponse((r) => r.url().endsWith("/hub/cards"));
  step("confirm", { visible: await confirm.isVisible(), state: await card.getAttribute("data-state") });
  await shot(page, "07a-cancel-confirm");
  await Promise.all([page.waitForNavigation(), confirm.click()]);
  await page.waitForSelector(".card[data-state=ended] details.log pre", { timeout: 60000 });
  await page.waitForFunction(() => !document.querySelector("#spawn-cpu fieldset").disabled, null, { timeout: 10000 });
  const ended = page.locator(".card[data-state=ended]").first();
  step("ended", { text: await ended.innerText(), formDisabled: await formDisabled(page) });
  await shot(page, "07-cancelled");

  // The older sessions, folded under the three newest.
  await page.click("#older summary");
  step("history", { shown: await page.locator("#history > .card").count(),
                    folded: await page.locator("#older .card").count() });
  await shot(page, "08-history");

  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${url}/hub/home`);
  await shot(page, "09-phone");
  step("lines", { lines: await page.evaluate(() => JSON.parse(sessionStorage.getItem("lines") || "[]")) });
} catch (e) {
  const page = context.pages()[0];
  if (page) await page.screenshot({ path: path.join(shots, "failure.png"), fullPage: true }).catch(() => {});
  console.log(JSON.stringify({ error: String(e && e.stack || e) }));
  process.exitCode = 1;
} finally {
  await context.close();
}
