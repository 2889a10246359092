// The timeline of a taskset: one lane per slave, one bar per trial, coloured by outcome.

import { duration, fill, h, parseTime, s } from "./dom.js";
import { statusLabel } from "./widgets.js";

const LANE = 24;
const BAR = 16;
const AXIS = 22;
const STEPS_S = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function tickLabel(seconds) {
  if (seconds === 0) return "0";
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return seconds % 60 ? `${Math.floor(seconds / 60)}m${seconds % 60}s` : `${seconds / 60}m`;
  return seconds % 3600 ? `${Math.floor(seconds / 3600)}h${(seconds % 3600) / 60}m` : `${seconds / 3600}h`;
}

/**
 * @param {import("./model.js").TasksetState} state
 * @param {number} width  pixels available
 * @param {(trial: object) => string} hrefOf  where a bar leads
 */
export function timeline(state, width, hrefOf, tips = new Map(), now = Date.now()) {
  const trials = [...state.trials.values()];
  if (trials.length === 0) {
    return h("div", { class: "empty small" }, h("p", { class: "empty-title" }, "No trials yet"),
      h("p", {}, "Each slave gets a lane here once it starts running files."));
  }
  const startOf = (trial) => parseTime(trial.started_at) ?? parseTime(trial.created_at);
  const endOf = (trial) => parseTime(trial.finished_at) ?? (trial.status ? startOf(trial) : now);
  let t0 = parseTime(state.taskset.created_at) ?? Math.min(...trials.map(startOf));
  t0 = Math.min(t0, ...trials.map(startOf));
  let t1 = parseTime(state.taskset.finished_at) ?? now;
  t1 = Math.max(t1, ...trials.map(endOf), t0 + 1000);

  const lanes = [...state.slaves.values()].sort((a, b) => a.id - b.id);
  const laneOf = new Map(lanes.map((slave, index) => [slave.id, index]));
  for (const trial of trials) {
    if (!laneOf.has(trial.slave_id)) {
      laneOf.set(trial.slave_id, lanes.length);
      lanes.push({ id: trial.slave_id, name: `slave ${trial.slave_id}`, status: null });
    }
  }

  const labelWidth = Math.min(180, Math.max(90, Math.round(width * 0.2)));
  const plotWidth = Math.max(120, width - labelWidth - 12);
  const height = AXIS + lanes.length * LANE + 4;
  const x = (ms) => labelWidth + ((ms - t0) / (t1 - t0)) * plotWidth;

  const svg = s("svg", {
    class: "timeline", width: String(width), height: String(height), role: "img",
    "aria-label": `Timeline of ${trials.length} trials on ${lanes.length} slaves`,
  });

  // Time axis and grid.
  const spanS = (t1 - t0) / 1000;
  const step = STEPS_S.find((candidate) => spanS / candidate <= Math.max(3, Math.floor(plotWidth / 90))) ?? 86400;
  const grid = s("g", { class: "grid" });
  for (let second = 0; second <= spanS; second += step) {
    const gx = x(t0 + second * 1000);
    grid.append(
      s("line", { x1: gx, x2: gx, y1: AXIS - 4, y2: height }),
      s("text", { x: gx, y: AXIS - 8, "text-anchor": second === 0 ? "start" : "middle" }, tickLabel(second)));
  }
  svg.append(grid);

  // Lanes.
  const byTask = new Map();
  for (const trial of [...trials].sort((a, b) => a.id - b.id)) {
    if (!byTask.has(trial.task_id)) byTask.set(trial.task_id, []);
    byTask.get(trial.task_id).push(trial);
  }
  lanes.forEach((slave, index) => {
    const y = AXIS + index * LANE;
    svg.append(
      s("rect", { class: ["lane", index % 2 && "odd"], x: 0, y, width, height: LANE }),
      s("circle", { class: "lane-dot", cx: 8, cy: y + LANE / 2, r: 4, "data-status": slave.status || "running" },
        s("title", {}, slave.status ? statusLabel(slave.status) : "running")),
      s("text", { class: "lane-label", x: 18, y: y + LANE / 2 + 4 }, clip(slave.name, labelWidth - 22)));
  });

  // Bars. A running trial well past what its file usually takes is a straggler.
  const finished = trials.filter((t) => t.status === "passed" || t.status === "pending").map((t) => endOf(t) - startOf(t))
    .sort((a, b) => a - b);
  const typical = finished.length ? finished[Math.floor(finished.length / 2)] : null;
  const bars = s("g", { class: "bars" });
  for (const trial of trials) {
    const task = state.tasks.get(trial.task_id);
    const attempt = (byTask.get(trial.task_id) || []).indexOf(trial) + 1;
    const start = startOf(trial);
    const end = endOf(trial);
    const y = AXIS + laneOf.get(trial.slave_id) * LANE + (LANE - BAR) / 2;
    const x0 = x(start);
    const barWidth = Math.max(3, x(end) - x0);
    const status = trial.status || "running";
    const history = task ? state.averages.get(task.spec_sha1) : null;
    const expected = history !== null && history !== undefined ? history * 1000 : typical;
    const straggling = !trial.status && expected !== null && end - start > Math.max(2 * expected, 5000);
    const slave = state.slaves.get(trial.slave_id);
    const bar = s("a", {
      href: hrefOf(trial), class: "bar-link", "aria-label": task ? task.spec_path : `task ${trial.task_id}`,
      "data-trial-id": String(trial.id),
    },
    s("rect", {
      class: ["bar", attempt > 1 && "retry", straggling && "straggler"], "data-status": status,
      x: x0, y, width: barWidth, height: BAR, rx: 3,
    }));
    tips.set(trial.id, [
      task ? task.spec_path : `task ${trial.task_id}`,
      `${statusLabel(status)} · ${duration(end - start)}${attempt > 1 ? ` · try ${attempt}` : ""}`,
      slave ? slave.name : `slave ${trial.slave_id}`,
      straggling ? `straggling: usually about ${duration(expected)}` : null,
    ].filter(Boolean));
    if (barWidth > 60 && task) {
      bar.append(s("text", { class: ["bar-label", status === "running" && "on-running"], x: x0 + 5, y: y + BAR - 4 },
        clip(basename(task.spec_path), barWidth - 8)));
    }
    bars.append(bar);
  }
  svg.append(bars);
  return svg;
}

function basename(path) {
  return path.slice(path.lastIndexOf("/") + 1);
}

/** Shorten `text` to fit about `pixels` at the timeline's font size. */
function clip(text, pixels) {
  const fits = Math.max(1, Math.floor(pixels / 6.6));
  return text.length <= fits ? text : `${text.slice(0, Math.max(1, fits - 1))}…`;
}

export function legend() {
  const item = (status) => h("span", { class: "legend-item" }, h("span", { class: "swatch", dataset: { status } }),
    statusLabel(status));
  return h("div", { class: "legend" }, ["passed", "pending", "failed", "error", "timeout", "running"].map(item),
    h("span", { class: "legend-item" }, h("span", { class: "swatch retry" }), "retry"),
    h("span", { class: "legend-item" }, h("span", { class: "swatch straggler" }), "straggler"));
}

/** The timeline with a tooltip that survives redraws (the chart is redrawn every second while running). */
export class TimelineView {
  constructor(hrefOf) {
    this.hrefOf = hrefOf;
    this.tips = new Map();
    this.hovered = null;
    this.chart = h("div", { class: "timeline-chart" });
    this.tip = h("div", { class: "tip", hidden: true, role: "tooltip" });
    this.element = h("div", { class: "timeline-body" }, this.chart, this.tip);
    this.chart.addEventListener("mousemove", (event) => this.hover(event));
    this.chart.addEventListener("mouseleave", () => {
      this.hovered = null;
      this.tip.hidden = true;
    });
  }

  draw(state) {
    this.tips = new Map();
    const width = this.chart.clientWidth || 800;
    fill(this.chart, timeline(state, width, this.hrefOf, this.tips));
    if (this.hovered !== null) this.show(this.hovered);
  }

  hover(event) {
    const bar = event.target.closest("[data-trial-id]");
    if (!bar) {
      this.hovered = null;
      this.tip.hidden = true;
      return;
    }
    const box = this.element.getBoundingClientRect();
    this.tip.style.left = `${Math.min(event.clientX - box.left + 14, box.width - 260)}px`;
    this.tip.style.top = `${event.clientY - box.top + 16}px`;
    this.hovered = Number(bar.getAttribute("data-trial-id"));
    this.show(this.hovered);
  }

  show(trialId) {
    const lines = this.tips.get(trialId);
    if (!lines) {
      this.tip.hidden = true;
      return;
    }
    fill(this.tip, h("div", { class: "tip-title" }, lines[0]), lines.slice(1).map((line) => h("div", {}, line)));
    this.tip.hidden = false;
  }
}
