// Building the page from data: elements and text nodes only, never markup parsed from a string.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(element, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") element.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(element.style, value);
    else if (key.startsWith("on") && typeof value === "function") element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

/** Append children: nodes as they are, strings and numbers as text, arrays flattened, null skipped. */
export function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.appendChild(child);
    else parent.appendChild(document.createTextNode(String(child)));
  }
  return parent;
}

/** An HTML element: h("a", {href: "#/"}, "text", child, ...). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** A path as text with a line-break opportunity after each "/" (as <wbr> elements, not markup). */
export function pathText(path) {
  const parts = path.split("/");
  return parts.flatMap((part, index) => (index < parts.length - 1 ? [`${part}/`, document.createElement("wbr")] : [part]));
}

export function clear(element) {
  element.replaceChildren();
  return element;
}

/** Replace the children of `element` with `children`. */
export function fill(element, ...children) {
  element.replaceChildren();
  return append(element, children);
}

/** Calls `fn` once on the next animation frame however often it is asked for before then. */
export function coalesce(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    const run = () => {
      if (!pending) return;
      pending = false;
      fn();
    };
    requestAnimationFrame(run);
    setTimeout(run, 250); // rAF does not fire in a hidden tab
  };
}

// -- formatting -----------------------------------------------------------------------

export function parseTime(text) {
  if (!text) return null;
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms;
}

/** "850 ms", "12.3 s", "4m 05s", "2h 03m". */
export function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const totalSeconds = ms / 1000;
  if (totalSeconds < 60) return `${totalSeconds < 10 ? totalSeconds.toFixed(1) : Math.floor(totalSeconds)} s`;
  const seconds = Math.floor(totalSeconds % 60);
  const minutes = Math.floor(totalSeconds / 60) % 60;
  const hours = Math.floor(totalSeconds / 3600);
  if (hours === 0) return `${minutes}m ${String(seconds).padStart(2, "0")}s`;
  if (hours < 48) return `${hours}h ${String(minutes).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

/** "just now", "5 min ago", "3 h ago", else a date. */
export function ago(ms, now = Date.now()) {
  if (ms === null) return "—";
  const seconds = Math.max(0, (now - ms) / 1000);
  if (seconds < 10) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(ms).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

export function localTime(ms) {
  if (ms === null) return "";
  return new Date(ms).toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function plural(count, one, many = `${one}s`) {
  return `${count.toLocaleString()} ${count === 1 ? one : many}`;
}

// ANSI colour and cursor sequences that test runners write to a terminal.
const ANSI = /\u001b\[[0-9;?]*[ -/]*[@-~]/g;

export function plainText(text) {
  return (text || "").replace(ANSI, "");
}

/** A <time> element whose text is kept fresh by `tick()`: an age, or a running duration. */
export function ticking(kind, startMs, endMs = null) {
  const element = h("span", {
    class: "tick",
    dataset: { kind, start: String(startMs ?? ""), end: String(endMs ?? "") },
    title: kind === "ago" ? localTime(startMs) : null,
  });
  renderTick(element, Date.now());
  return element;
}

function renderTick(element, now) {
  const start = element.dataset.start === "" ? null : Number(element.dataset.start);
  const end = element.dataset.end === "" ? null : Number(element.dataset.end);
  if (element.dataset.kind === "ago") element.textContent = ago(start, now);
  else element.textContent = start === null ? "—" : duration((end ?? now) - start);
}

/** Refresh every ticking element under `root`. */
export function tick(root = document) {
  const now = Date.now();
  for (const element of root.querySelectorAll(".tick")) renderTick(element, now);
}
