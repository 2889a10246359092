// The live workers: their type and what they run, read again every few seconds.

import { get } from "../api.js";
import { fill, h, ticking } from "../dom.js";
import { countsLine, empty, failure, link, pill, progressBar } from "../widgets.js";

const REFRESH_MS = 5000;

export class WorkersPage {
  constructor(root) {
    this.root = root;
    this.closed = false;
    this.timer = null;
    this.loadedAt = null;
    this.subtitle = h("p", { class: "subtitle" });
    this.stats = h("div", { class: "stats compact" });
    this.body = h("div", { class: "card-body" }, h("div", { class: "loading" }, "Loading…"));
    this.errorBox = h("div");
    fill(root,
      h("div", { class: "page-head" }, h("h1", {}, "Workers"), this.subtitle),
      this.errorBox,
      this.stats,
      h("section", { class: "card", id: "workers" }, this.body));
    document.title = "Workers · testfleet";
    this.load();
  }

  matches(route) {
    return route.name === "workers";
  }

  update() {}

  unmount() {
    this.closed = true;
    clearTimeout(this.timer);
  }

  async load() {
    try {
      const [{ workers }, { tasksets }] = await Promise.all([get("/workers"), get("/tasksets?active=true&limit=500")]);
      const known = new Map(tasksets.map((t) => [t.id, t]));
      // A worker may still hold a taskset that has just finished: read those one by one.
      const missing = [...new Set(workers.map((w) => w.taskset_id))].filter((id) => id !== null && !known.has(id));
      const extra = await Promise.all(missing.slice(0, 50).map((id) => get(`/tasksets/${id}`).catch(() => null)));
      for (const taskset of extra) if (taskset) known.set(taskset.id, taskset);
      if (this.closed) return;
      this.loadedAt = Date.now();
      fill(this.errorBox);
      this.draw(workers, known);
    } catch (error) {
      if (this.closed) return;
      fill(this.errorBox, failure(error));
      if (error.fatal) return;
    }
    this.timer = setTimeout(() => this.load(), REFRESH_MS);
  }

  draw(workers, tasksets) {
    const busy = workers.filter((w) => w.taskset_id !== null).length;
    const types = new Set(workers.map((w) => w.worker_type));
    fill(this.subtitle, "Refreshed every 5 s · last read ", ticking("ago", this.loadedAt));
    const stat = (label, value) => h("div", { class: "stat" }, h("div", { class: "stat-value" }, String(value)),
      h("div", { class: "stat-label" }, label));
    fill(this.stats, stat("Workers", workers.length), stat("Busy", busy), stat("Free", workers.length - busy),
      stat(types.size === 1 ? "Type" : "Types", types.size));
    if (workers.length === 0) {
      fill(this.body, empty("No workers connected", "Start one with testfleet worker; it appears here within seconds."));
      return;
    }
    const sorted = [...workers].sort((a, b) => a.worker_type.localeCompare(b.worker_type) || a.name.localeCompare(b.name));
    fill(this.body, h("div", { class: "table-wrap" }, h("table", { class: "workers" },
      h("thead", {}, h("tr", {}, h("th", {}, "Worker"), h("th", {}, "Type"), h("th", {}, "State"),
        h("th", { class: "wide" }, "Running"))),
      h("tbody", {}, sorted.map((worker) => {
        const taskset = worker.taskset_id !== null ? tasksets.get(worker.taskset_id) : null;
        let running = h("span", { class: "muted" }, "—");
        if (worker.taskset_id !== null) {
          running = taskset
            ? h("div", { class: "progress-cell" },
              link(`/tasksets/${taskset.id}`, taskset.rsync_name, h("span", { class: "muted" }, ` #${taskset.id}`)),
              pill(taskset.status),
              progressBar({ total: taskset.task_count, passed: taskset.passed_count, pending: taskset.pending_count,
                failed: taskset.failed_count }),
              h("span", { class: "hide-sm" }, countsLine({ passed: taskset.passed_count, pending: taskset.pending_count,
                failed: taskset.failed_count })))
            : link(`/tasksets/${worker.taskset_id}`, `#${worker.taskset_id}`);
        }
        return h("tr", { dataset: { worker: worker.name } },
          h("td", { class: "mono" }, worker.name),
          h("td", {}, h("span", { class: "tag" }, worker.worker_type)),
          h("td", {}, pill(worker.taskset_id !== null ? "busy" : "free")),
          h("td", { class: "wide" }, running));
      })))));
  }
}
