// Small pieces shared by the pages: status pills, progress bars, empty states, errors.

import { h } from "./dom.js";

const LABELS = {
  rsync_waiting: "rsync waiting",
  waiting: "waiting",
  running: "running",
  succeeded: "succeeded",
  failed: "failed",
  cancelled: "cancelled",
  passed: "passed",
  pending: "pending",
  error: "error",
  timeout: "timeout",
  retrying: "retrying",
  queued: "queued",
  not_run: "not run",
  normal_exit: "normal exit",
  timeout_exit: "timeout exit",
  failure_exit: "failure exit",
  busy: "busy",
  free: "free",
};

export function statusLabel(status) {
  return LABELS[status] || String(status);
}

/** A coloured pill; `status` also names its colour (see style.css). */
export function pill(status, text = statusLabel(status)) {
  return h("span", { class: "pill", dataset: { status } }, text);
}

/** A stacked bar of decided files (passed, pending, failed) and running ones, out of `total`. */
export function progressBar({ total, passed, pending, failed, running = 0 }, { large = false } = {}) {
  const bar = h("div", {
    class: ["progress", large && "large"],
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": String(total),
    "aria-valuenow": String(passed + pending + failed),
  });
  const part = (kind, count) => {
    if (!count || !total) return null;
    return h("span", { class: `seg ${kind}`, style: { width: `${(100 * count) / total}%` } });
  };
  bar.append(
    ...[part("passed", passed), part("pending", pending), part("failed", failed), part("running", running)]
      .filter(Boolean),
  );
  return bar;
}

/** "12 passed · 1 pending · 2 failed", the zero ones dimmed. */
export function countsLine({ passed, pending, failed }) {
  const item = (kind, count, label) => h("span", { class: ["count", kind, count === 0 && "zero"] }, String(count), " ", label);
  return h("span", { class: "counts" }, item("passed", passed, "passed"), item("pending", pending, "pending"),
    item("failed", failed, "failed"));
}

export function empty(title, detail = null) {
  return h("div", { class: "empty" }, h("p", { class: "empty-title" }, title), detail && h("p", {}, detail));
}

/** A message for an API failure; an unauthorized one explains the token. */
export function failure(error) {
  if (error && error.unauthorized) {
    return h("div", { class: "notice error" },
      h("strong", {}, "This coordinator needs a viewer token. "),
      "Open the dashboard with ", h("code", {}, "?token=…"), " in its address.");
  }
  if (error && error.status === 404) {
    return h("div", { class: "notice" }, h("strong", {}, "Not found. "), error.message);
  }
  return h("div", { class: "notice error" }, h("strong", {}, "Could not load: "),
    (error && error.message) || String(error), ". Retrying when the connection is back.");
}

/** A link inside the dashboard (hash routes keep the page's ?token=). */
export function link(path, ...children) {
  return h("a", { href: `#${path}` }, ...children);
}

export function sectionTitle(text, ...extra) {
  return h("div", { class: "section-head" }, h("h2", {}, text), ...extra);
}
