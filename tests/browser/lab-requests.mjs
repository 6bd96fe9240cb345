// bench/hub's recorder: the requests Debian's headless Chromium makes to a
// user's JupyterLab through the hub while it opens JupyterLab (until the
// launcher shows) and a new notebook (until its kernel is idle). One JSON
// line per step on stdout; the last, "requests", lists them in the order
// the browser sent them (method, URL, the headers that shape the answer,
// resource type, status), for bench/hub to replay through the hub and
// straight to the server's socket.
//
// Environment: HUB_URL, HUB_USER, HUB_COOKIE (the hub's login cookie,
// "name=value"), CHROMIUM, PROFILE_DIR (a fresh directory).
import { env, launch, step } from "./common.mjs";

const url = env("HUB_URL"), user = env("HUB_USER");
const [cookieName, ...rest] = env("HUB_COOKIE").split("=");
const base = `${url}/user/${user}/`;
// What shapes the server's answer (its encoding and type); cookies and the
// XSRF header are the replayer's own.
const KEPT = ["accept", "accept-encoding", "content-type"];

const context = await launch({ width: 1280, height: 900 });
try {
  await context.addCookies([{ name: cookieName, value: rest.join("="), url }]);
  const requests = [];
  context.on("request", (r) => {
    if (!r.url().startsWith(base)) return;
    const headers = Object.fromEntries(Object.entries(r.headers()).filter(([k]) => KEPT.includes(k)));
    requests.push({ method: r.method(), url: r.url().slice(url.length), headers, type: r.resourceType(),
                    request: r });
  });
  const page = context.pages()[0] ?? await context.newPage();
  const t0 = Date.now();
  await page.goto(`${base}lab`);
  await page.waitForSelector(".jp-LauncherCard", { timeout: 120000 });
  step("launcher", { ms: Date.now() - t0 });
  const t1 = Date.now();
  await page.click('.jp-LauncherCard[data-category="Notebook"]');
  await page.locator(".jp-Notebook .jp-Cell .cm-content").first().waitFor({ timeout: 60000 });
  await page.locator(".jp-StatusBar-TextItem", { hasText: "| Idle" }).first().waitFor({ timeout: 120000 });
  step("notebook", { ms: Date.now() - t1 });
  for (const r of requests) {
    const resp = await r.request.response().catch(() => null);
    r.status = resp ? resp.status() : null;
    delete r.request;
  }
  step("requests", { requests });
} catch (e) {
  step("failed", { error: String(e) });
  process.exitCode = 1;
} finally {
  await context.close();
}
