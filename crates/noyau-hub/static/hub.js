// The home page's script (the page works without it; this keeps it current):
// refreshes the session cards every 2 s from /hub/cards, keeping what the user
// opened (a Cancel confirmation, the history, a log) and where the keyboard
// focus was; enables the start forms only while no session is live; says
// state changes to screen readers; raises a browser notification when a
// session starts and when its time left falls under ten minutes.
(function () {
  const cards = document.getElementById("cards");
  if (!cards) return;
  const seen = {};
  function notify(text) {
    if (!("Notification" in window)) return;
    if (Notification.permission === "granted") new Notification(document.title, { body: text });
  }
  if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
  function announce(text) {
    const a = document.getElementById("announce");
    if (a) a.textContent = text;
  }
  function syncForms() {
    const live = cards.querySelectorAll(".card[data-session]:not([data-state=ended])").length > 0;
    for (const f of document.querySelectorAll("fieldset.spawn-fields")) f.disabled = live;
    for (const n of document.querySelectorAll(".busy-note")) n.hidden = !live;
    for (const b of cards.querySelectorAll("button.relaunch")) b.disabled = live;
  }
  function follow(first) {
    for (const c of cards.querySelectorAll(".card[data-session]")) {
      const id = c.dataset.session, st = c.dataset.state, left = Number(c.dataset.left || -1);
      const was = seen[id] || {};
      if (!first && was.state && was.state !== st) {
        const what = c.querySelector(".state");
        announce(what ? what.textContent.trim() : st);
        if (st === "running") notify("Your session is running: " + c.dataset.url);
      }
      let warned = was.warned;
      if (!first && st === "running" && left >= 0 && left < 600 && !warned) {
        notify("Your session ends in " + Math.max(1, Math.round(left / 60)) + " min (walltime)");
        warned = true;
      }
      seen[id] = { state: st, warned: warned };
    }
  }
  async function refresh() {
    try {
      const r = await fetch("/hub/cards", { credentials: "same-origin" });
      if (!r.ok) return;
      const html = await r.text();
      const open = [...cards.querySelectorAll("details[open][id]")].map((d) => d.id);
      const focused = document.activeElement && cards.contains(document.activeElement) ? document.activeElement.id : "";
      cards.innerHTML = html;
      for (const id of open) {
        const d = document.getElementById(id);
        if (d) d.open = true;
      }
      if (focused) {
        const f = document.getElementById(focused);
        if (f) f.focus();
      }
      follow(false);
      syncForms();
    } catch (e) {}
  }
  follow(true);
  // A page loaded with a session already near its end warns once too.
  for (const c of cards.querySelectorAll(".card[data-state=running]")) {
    const left = Number(c.dataset.left || -1);
    if (left >= 0 && left < 600) { notify("Your session ends in " + Math.max(1, Math.round(left / 60)) + " min (walltime)"); seen[c.dataset.session].warned = true; }
  }
  syncForms();
  setInterval(refresh, 2000);
})();
