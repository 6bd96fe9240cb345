// What the browser scenarios share: the environment, one JSON line per step
// on stdout, and Debian's headless Chromium (no downloaded browser).
import { chromium } from "playwright-core";

export const env = (k, d) => process.env[k] ?? d ?? (() => { throw new Error(`${k} is not set`); })();

const started = Date.now();
export const step = (name, extra = {}) =>
  console.log(JSON.stringify({ step: name, ms: Date.now() - started, ...extra }));

// A fresh persistent context in $PROFILE_DIR ($CHROMIUM, default /usr/bin/chromium).
export const launch = (viewport) =>
  chromium.launchPersistentContext(env("PROFILE_DIR"), {
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport,
  });
