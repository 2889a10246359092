// The machines behind a taskset: its slaves with their exit statuses, and worker logs that grow live.

import { duration, fill, h, parseTime, plainText, ticking } from "../dom.js";
import { FAILING_TRIALS } from "../model.js";
import { empty, link, pill } from "../widgets.js";

export function slavesTable(state, tasksetId) {
  const slaves = [...state.slaves.values()].sort((a, b) => a.id - b.id);
  if (slaves.length === 0) return empty("No slaves yet", "They appear when a worker starts running this taskset.");
  const stats = new Map(slaves.map((slave) => [slave.id, { tries: 0, failing: 0 }]));
  for (const trial of state.trials.values()) {
    const stat = stats.get(trial.slave_id);
    if (!stat) continue;
    stat.tries += 1;
    if (FAILING_TRIALS.has(trial.status)) stat.failing += 1;
  }
  return h("div", { class: "table-wrap" }, h("table", { class: "slaves" },
    h("thead", {}, h("tr", {}, h("th", {}, "Slave"), h("th", {}, "Status"), h("th", {}, "Running now"),
      h("th", { class: "num" }, "Tries"))),
    h("tbody", {}, slaves.map((slave) => {
      const trial = slave.current_trial ? state.trials.get(slave.current_trial) : null;
      const running = trial && !trial.status ? trial : null;
      const task = running ? state.tasks.get(running.task_id) : null;
      const stat = stats.get(slave.id);
      return h("tr", { dataset: { slaveId: String(slave.id) } },
        h("td", { class: "mono" }, slave.name),
        h("td", {}, pill(slave.status || (running ? "running" : "idle"))),
        h("td", { class: "running-now" }, task
          ? [basenameLink(`/tasksets/${tasksetId}/files/${task.id}`, task.spec_path), " ",
            h("span", { class: "muted nowrap" },
              ticking("duration", parseTime(running.started_at) ?? parseTime(running.created_at)))]
          : h("span", { class: "muted" }, slave.status ? "—" : "waiting for work")),
        h("td", { class: "num" }, String(stat.tries),
          stat.failing ? h("span", { class: "failed-text", title: "tries that failed, errored or timed out" },
            ` · ${stat.failing} ✗`) : null));
    }))));
}

/** A link showing a path's last two parts, the whole path in its tooltip. */
function basenameLink(route, path) {
  const anchor = link(route, path.split("/").slice(-2).join("/"));
  anchor.title = path;
  anchor.classList.add("path");
  return anchor;
}

const PHASES = [
  ["sync", "started_at", "rsync_finished_at"],
  ["setup", "rsync_finished_at", "setup_finished_at"],
  ["tests", "setup_finished_at", "rspec_finished_at"],
];

function phases(log) {
  const chips = [];
  for (const [name, from, to] of PHASES) {
    const start = parseTime(log[from]);
    const end = parseTime(log[to]);
    if (end !== null && start !== null) {
      chips.push(h("span", { class: "phase done" }, `${name} `, h("span", { class: "muted" }, duration(end - start))));
    } else if (start !== null && !log.finished_at) {
      chips.push(h("span", { class: "phase now" }, `${name} `, h("span", { class: "muted" }, ticking("duration", start))));
      break;
    } else {
      chips.push(h("span", { class: "phase" }, name));
    }
  }
  if (log.finished_at) chips.push(h("span", { class: "phase done" }, "finished"));
  return chips;
}

/** Worker logs, one collapsible block each; appended text is added in place so scrolling stays put. */
export class WorkerLogsView {
  constructor() {
    this.element = h("div", { class: "worker-logs" });
    this.blocks = new Map();
  }

  /** Rebuild from the state (after a load), keeping which blocks are open. */
  sync(state) {
    const logs = [...state.workerLogs.values()].sort((a, b) => a.id - b.id);
    if (logs.length === 0) {
      this.blocks.clear();
      fill(this.element, empty("No worker logs yet", "A worker writes one as it syncs the code and runs the setup."));
      return;
    }
    const blocks = new Map();
    for (const log of logs) {
      const old = this.blocks.get(log.id);
      const block = this.block(log, old ? old.details.open : logs.length <= 3);
      block.pre.textContent = plainText(log.log);
      block.length = log.log.length;
      blocks.set(log.id, block);
    }
    this.blocks = blocks;
    fill(this.element, logs.map((log) => blocks.get(log.id).details));
    for (const block of blocks.values()) block.pre.scrollTop = block.pre.scrollHeight;
  }

  /** Phase changes, new logs, and text appended since the last call. */
  update(state, appended) {
    if ([...state.workerLogs.keys()].some((id) => !this.blocks.has(id)) || this.blocks.size !== state.workerLogs.size) {
      this.sync(state);
      return;
    }
    for (const [id, text] of appended) {
      const block = this.blocks.get(id);
      if (!block) continue;
      const pre = block.pre;
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
      pre.append(document.createTextNode(plainText(text)));
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    for (const log of state.workerLogs.values()) fill(this.blocks.get(log.id).phases, phases(log));
  }

  block(log, open) {
    const phaseBox = h("span", { class: "phases" }, phases(log));
    const pre = h("pre", { class: "log" });
    const details = h("details", { class: "worker-log", dataset: { workerLogId: String(log.id) }, open },
      h("summary", {}, h("span", { class: "mono worker-name" }, log.worker_name), phaseBox),
      pre);
    return { details, pre, phases: phaseBox };
  }
}

