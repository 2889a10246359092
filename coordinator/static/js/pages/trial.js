// One trial on its own (a link from CI output): what it was, and its stdout and stderr.

import { get } from "../api.js";
import { duration, fill, h, localTime, parseTime } from "../dom.js";
import { trialMs } from "../model.js";
import { failure, link, pill } from "../widgets.js";
import { outputView } from "./files.js";

const POLL_MS = 3000;

export class TrialPage {
  constructor(root, route) {
    this.root = root;
    this.id = route.id;
    this.timer = null;
    this.closed = false;
    this.body = h("div");
    this.output = h("div");
    fill(root, this.body, this.output);
    fill(this.body, h("div", { class: "loading" }, "Loading…"));
    document.title = `Trial #${this.id} · testfleet`;
    this.load();
  }

  matches(route) {
    return route.name === "trial" && route.id === this.id;
  }

  update() {}

  unmount() {
    this.closed = true;
    clearTimeout(this.timer);
  }

  async load() {
    let trial;
    try {
      trial = await get(`/trials/${this.id}`);
    } catch (error) {
      if (this.closed) return;
      fill(this.body, crumbs(this.id), failure(error));
      if (!error.fatal) this.timer = setTimeout(() => this.load(), POLL_MS);
      return;
    }
    if (this.closed) return;
    if (trial.taskset_id && trial.task_id) {
      // The taskset page shows this trial among its file's tries, live.
      window.location.replace(`#/tasksets/${trial.taskset_id}/files/${trial.task_id}/trials/${trial.id}`);
      return;
    }
    this.draw(trial);
    if (!trial.status) this.timer = setTimeout(() => this.load(), POLL_MS);
  }

  draw(trial) {
    const started = parseTime(trial.started_at) ?? parseTime(trial.created_at);
    fill(this.body,
      h("div", { class: "page-head" }, crumbs(this.id),
        h("div", { class: "title-row" }, h("h1", {}, trial.spec_path || `Trial #${trial.id}`), pill(trial.status || "running")),
        h("p", { class: "subtitle" }, `trial #${trial.id} of task #${trial.task_id} on slave #${trial.slave_id}`)),
      h("section", { class: "card" },
        h("dl", { class: "facts" },
          h("dt", {}, "Started"), h("dd", {}, localTime(started)),
          h("dt", {}, "Finished"), h("dd", {}, trial.finished_at ? localTime(parseTime(trial.finished_at)) : "still running"),
          h("dt", {}, "Duration"), h("dd", {}, trial.status ? duration(trialMs(trial)) : "—"),
          h("dt", {}, "Tests"), h("dd", {}, trial.status
            ? `${trial.passed ?? 0} passed · ${trial.pending ?? 0} pending · ${trial.failed ?? 0} failed` : "—"))));
    if (trial.status) fill(this.output, h("section", { class: "card" }, outputView(trial)));
  }
}

function crumbs(id) {
  return h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, link("/tasksets", "Tasksets"), h("span", {}, " / "),
    h("span", {}, `Trial #${id}`));
}
