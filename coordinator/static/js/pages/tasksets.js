// The tasksets page: the active ones and the recent finished ones (paginated), kept live.
//
// listen_to_global tells of new tasksets and status changes; the counts of an active taskset only travel on
// its own stream, so the page also listens to each active taskset it shows.

import { get } from "../api.js";
import { coalesce, fill, h, parseTime, ticking } from "../dom.js";
import { Live } from "../live.js";
import { ACTIVE, mergeTaskset, refId } from "../model.js";
import { countsLine, empty, failure, link, pill, progressBar, sectionTitle } from "../widgets.js";

const PAGE = 20;
const ACTIVE_LIMIT = 200;

export class TasksetsPage {
  constructor(root, route) {
    this.root = root;
    this.before = route.before;
    this.active = new Map();
    this.recent = [];
    this.more = false;
    this.loaded = false;
    this.error = null;
    this.listening = new Set();
    this.fetching = new Set();
    this.render = coalesce(() => this.draw());
    this.activeBody = h("div", { class: "card-body" });
    this.recentBody = h("div", { class: "card-body" });
    this.heading = h("p", { class: "subtitle" });
    this.errorBox = h("div");
    fill(root,
      h("div", { class: "page-head" }, h("h1", {}, "Tasksets"), this.heading),
      this.errorBox,
      h("section", { class: "card", id: "active-tasksets" }, sectionTitle("Active"), this.activeBody),
      h("section", { class: "card", id: "recent-tasksets" }, sectionTitle("Recent"), this.recentBody));
    document.title = "Tasksets · testfleet";
    this.live = new Live({
      subscribe: async (live) => {
        this.listening = new Set();
        await live.call("listen_to_global", []);
      },
      sync: () => this.sync(),
      note: (method, params) => this.note(method, params),
      failed: (error) => {
        this.error = error;
        this.render();
      },
    }).start();
    this.render();
  }

  matches(route) {
    return route.name === "tasksets" && route.before === this.before;
  }

  update() {}

  unmount() {
    this.live.close();
  }

  async fetchLists() {
    const before = this.before ? `&before=${this.before}` : "";
    const [active, recent] = await Promise.all([
      get(`/tasksets?active=true&limit=${ACTIVE_LIMIT}`),
      get(`/tasksets?active=false&limit=${PAGE + 1}${before}`),
    ]);
    this.active = new Map(active.tasksets.map((t) => [t.id, mergeTaskset(t, this.active.get(t.id) || {})]));
    this.more = recent.tasksets.length > PAGE;
    this.recent = recent.tasksets.slice(0, PAGE);
  }

  async sync() {
    await this.fetchLists();
    // Listen to each active taskset for its counts, then read again what changed before the listens.
    const fresh = [...this.active.keys()].filter((id) => !this.listening.has(id));
    if (fresh.length) {
      await Promise.all(fresh.map((id) => this.listen(id)));
      await this.fetchLists();
    }
    this.loaded = true;
    this.error = null;
    this.render();
  }

  async listen(id) {
    this.listening.add(id);
    try {
      await this.live.call("listen_to_taskset", [["taskset", id]]);
    } catch (error) {
      this.listening.delete(id);
      if (error.status !== -32004) throw error;
    }
  }

  /** Fetch a taskset this page has not seen yet (created, or changed before the page listened). */
  async adopt(id) {
    if (this.fetching.has(id)) return;
    this.fetching.add(id);
    try {
      if (!this.listening.has(id)) await this.listen(id);
      const record = await get(`/tasksets/${id}`);
      this.place(record);
    } catch (error) {
      // A dropped connection resyncs everything anyway.
    } finally {
      this.fetching.delete(id);
    }
  }

  place(record) {
    const known = this.active.get(record.id) || this.recent.find((t) => t.id === record.id);
    const taskset = known ? mergeTaskset(known, record) : record;
    if (ACTIVE.has(taskset.status)) {
      this.active.set(taskset.id, taskset);
    } else {
      this.active.delete(taskset.id);
      if (!this.before && !this.recent.includes(taskset)) {
        this.recent = [taskset, ...this.recent.filter((t) => t.id !== taskset.id)]
          .sort((a, b) => b.id - a.id);
        if (this.recent.length > PAGE) {
          this.recent = this.recent.slice(0, PAGE);
          this.more = true;
        }
      }
    }
    this.render();
  }

  note(method, params) {
    if (method === "taskset_created") {
      this.adopt(refId(params[1]));
      return;
    }
    if (method !== "taskset_updated") return;
    const id = refId(params[1]);
    const hash = params[2] || {};
    const known = this.active.get(id) || this.recent.find((t) => t.id === id);
    if (!known) {
      if (!hash.status || ACTIVE.has(hash.status) || !this.before) this.adopt(id);
      return;
    }
    mergeTaskset(known, hash);
    this.place(known);
  }

  draw() {
    fill(this.errorBox, this.error && !this.loaded ? failure(this.error) : null);
    if (!this.loaded) {
      fill(this.activeBody, h("div", { class: "loading" }, "Loading…"));
      fill(this.recentBody);
      return;
    }
    const active = [...this.active.values()].sort((a, b) => b.id - a.id);
    const running = active.filter((t) => t.status === "running").length;
    fill(this.heading, active.length
      ? `${active.length} active · ${running} running`
      : "Nothing running right now");
    fill(this.activeBody, active.length
      ? table(active)
      : empty("No active tasksets", "A taskset submitted with testfleet run shows up here as soon as it is created."));
    const pager = h("div", { class: "pager" },
      this.before ? link("/tasksets", "← Newest") : h("span"),
      this.more && this.recent.length
        ? link(`/tasksets?before=${this.recent[this.recent.length - 1].id}`, "Older →")
        : null);
    fill(this.recentBody, this.recent.length ? [table(this.recent), pager] : [empty("No finished tasksets yet"), pager]);
  }
}

function table(tasksets) {
  return h("div", { class: "table-wrap" }, h("table", { class: "tasksets" },
    h("thead", {}, h("tr", {},
      h("th", {}, "Taskset"), h("th", {}, "Status"), h("th", { class: "wide" }, "Progress"),
      h("th", { class: "hide-sm" }, "Results"), h("th", { class: "hide-sm" }, "Created"),
      h("th", { class: "num hide-sm" }, "Duration"))),
    h("tbody", {}, tasksets.map(row))));
}

function row(taskset) {
  const href = `#/tasksets/${taskset.id}`;
  const total = taskset.task_count ?? 0;
  const decided = (taskset.passed_count ?? 0) + (taskset.pending_count ?? 0) + (taskset.failed_count ?? 0);
  const counts = { passed: taskset.passed_count ?? 0, pending: taskset.pending_count ?? 0, failed: taskset.failed_count ?? 0 };
  const created = parseTime(taskset.created_at);
  return h("tr", {
    class: "clickable",
    dataset: { tasksetId: String(taskset.id), status: taskset.status },
    onclick: (event) => {
      if (event.target.closest("a") || window.getSelection().toString()) return;
      window.location.hash = href.slice(1);
    },
  },
  h("td", {},
    h("a", { class: "name", href }, taskset.rsync_name),
    h("div", { class: "meta" }, h("span", { class: "id" }, `#${taskset.id}`), " · ", taskset.taskset_class,
      " · ", taskset.worker_type)),
  h("td", {}, pill(taskset.status)),
  h("td", { class: "wide" },
    h("div", { class: "progress-cell" },
      progressBar({ total, ...counts }),
      h("span", { class: "fraction" }, `${decided} / ${total}`,
        h("span", { class: "show-sm" }, " · ", ticking("duration", created, parseTime(taskset.finished_at)))))),
  h("td", { class: "hide-sm" }, countsLine(counts)),
  h("td", { class: "hide-sm muted" }, ticking("ago", created)),
  h("td", { class: "num hide-sm" }, ticking("duration", created, parseTime(taskset.finished_at))));
}
