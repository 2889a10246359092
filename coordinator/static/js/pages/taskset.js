// One taskset: summary and ETA, timeline, files, one file's tries and output, slaves and worker logs; live.

import { get, rpc } from "../api.js";
import { coalesce, duration, fill, h, localTime, parseTime, ticking } from "../dom.js";
import { estimate } from "../eta.js";
import { Live } from "../live.js";
import { fileStatus, TasksetState } from "../model.js";
import { legend, TimelineView } from "../timeline.js";
import { countsLine, failure, link, pill, progressBar, sectionTitle } from "../widgets.js";
import { filePanelTop, filesTable, outputView } from "./files.js";
import { slavesTable, WorkerLogsView } from "./workers-of-taskset.js";

export class TasksetPage {
  constructor(root, route) {
    this.root = root;
    this.id = route.id;
    this.route = route;
    this.state = new TasksetState(this.id);
    this.view = { mode: "failures", sort: "status", descending: false, expanded: false,
      onChange: (change) => {
        Object.assign(this.view, change);
        this.render();
      } };
    this.error = null;
    this.held = null;
    this.ticks = 0;
    this.scrollToFile = Boolean(route.file);
    this.averagesAsked = false;
    this.output = { trialId: null, finished: false };
    this.render = coalesce(() => this.draw());

    this.head = h("div", { class: "page-head" });
    this.errorBox = h("div");
    this.summaryLive = h("div");
    this.commands = h("div");
    this.summary = h("section", { class: "card summary", id: "summary" }, this.summaryLive, this.commands);
    this.panelTop = h("div");
    this.outputBox = h("div");
    this.panel = h("section", { class: "card file-panel", id: "file", hidden: true }, this.panelTop, this.outputBox);
    this.timeline = new TimelineView((trial) => `#/tasksets/${this.id}/files/${trial.task_id}/trials/${trial.id}`);
    this.filesToggle = h("div");
    this.filesBody = h("div");
    this.slavesBody = h("div");
    this.logs = new WorkerLogsView();
    this.main = h("div", { class: "taskset-body", hidden: true },
      this.summary,
      this.panel,
      h("section", { class: "card", id: "timeline" }, sectionTitle("Timeline", legend()), this.timeline.element),
      h("section", { class: "card", id: "files" }, sectionTitle("Files", this.filesToggle), this.filesBody),
      h("div", { class: "columns" },
        h("section", { class: "card", id: "slaves" }, sectionTitle("Slaves"), this.slavesBody),
        h("section", { class: "card", id: "worker-logs" }, sectionTitle("Worker logs"), this.logs.element)));
    fill(root, this.head, this.errorBox, h("div", { class: "loading" }, "Loading…"), this.main);
    this.loadingBox = root.children[2];

    this.resize = new ResizeObserver(() => this.render());
    this.resize.observe(this.timeline.element);
    this.clock = setInterval(() => {
      // A big timeline is costly to redraw: every few seconds is enough for it to grow.
      this.ticks += 1;
      const every = this.state.trials.size > 3000 ? 5 : 1;
      if (this.state.active && this.ticks % every === 0) this.drawMoving();
    }, 1000);
    this.live = new Live({
      subscribe: (live) => live.call("listen_to_taskset", [["taskset", this.id]]),
      sync: () => this.sync(),
      note: (method, params) => this.note(method, params),
      replay: (notes) => {
        this.state.replay(notes);
        this.render();
      },
      failed: (error) => {
        this.error = error;
        this.render();
      },
    }).start();
  }

  matches(route) {
    return route.name === "taskset" && route.id === this.id;
  }

  update(route) {
    const fileChanged = route.file !== this.route.file;
    this.route = route;
    this.render();
    if (route.file && fileChanged) this.scrollToFile = true;
  }

  unmount() {
    this.live.close();
    this.resize.disconnect();
    clearInterval(this.clock);
  }

  async sync() {
    const base = `/tasksets/${this.id}`;
    const [taskset, tasks, slaves, logs] = await Promise.all([
      get(base), get(`${base}/tasks`), get(`${base}/slaves`), get(`${base}/worker_logs`),
    ]);
    this.state.load({ taskset, tasks: tasks.tasks, slaves: slaves.slaves, workerLogs: logs.worker_logs });
    this.error = null;
    if (!this.commands.firstChild) fill(this.commands, commands(taskset));
    this.logs.sync(this.state);
    this.state.appended = [];
    this.askAverages();
    this.render();
  }

  async askAverages() {
    if (this.averagesAsked) return;
    this.averagesAsked = true;
    const sha1s = [...new Set([...this.state.tasks.values()].map((task) => task.spec_sha1))].slice(0, 100000);
    if (sha1s.length === 0) return;
    try {
      const averages = await rpc("query_spec_average_secs", [this.state.taskset.taskset_class, sha1s]);
      sha1s.forEach((sha1, index) => this.state.averages.set(sha1, averages[index]));
      this.render();
    } catch (error) {
      this.averagesAsked = false; // without history the ETA uses this run's durations
    }
  }

  note(method, params) {
    if (this.held) {
      this.held.push([method, params]);
      return;
    }
    const wasActive = this.state.active;
    this.state.apply(method, params);
    if (wasActive && !this.state.active) this.refresh();
    this.render();
  }

  /** Read the state again while the connection stays up, holding notifications meanwhile (as a resync does).
   *  Used once a taskset finishes: trials' start times travel only in the read API. */
  async refresh() {
    if (this.held) return;
    this.held = [];
    try {
      await this.sync();
    } catch (error) {
      // The next reconnect resyncs anyway.
    }
    const held = this.held;
    this.held = null;
    this.state.replay(held);
    this.render();
  }

  draw() {
    const { state } = this;
    fill(this.errorBox, this.error && (!state.taskset || this.error.fatal) ? failure(this.error) : null);
    if (!state.taskset) {
      this.loadingBox.hidden = Boolean(this.error);
      fill(this.head, crumbs(`#${this.id}`));
      return;
    }
    this.loadingBox.hidden = true;
    this.main.hidden = false;
    const taskset = state.taskset;
    const decided = taskset.passed_count + taskset.pending_count + taskset.failed_count;
    document.title = `${taskset.rsync_name} #${taskset.id} · ${decided}/${taskset.task_count} · testfleet`;
    fill(this.head,
      crumbs(`#${taskset.id}`),
      h("div", { class: "title-row" }, h("h1", {}, taskset.rsync_name), pill(taskset.status)),
      h("p", { class: "subtitle" },
        h("span", {}, `#${taskset.id}`), " · ", h("span", {}, taskset.taskset_class), " · worker type ",
        h("span", {}, taskset.worker_type), " · created ", ticking("ago", parseTime(taskset.created_at))));
    this.drawMoving();

    if (this.route.file) {
      this.panel.hidden = false;
      fill(this.panelTop, filePanelTop(state, this.route.file, this.route.trial, this.id));
      const trial = this.route.trial ? state.trials.get(this.route.trial) : null;
      const belongs = trial && trial.task_id === this.route.file;
      const key = { trialId: belongs ? trial.id : null, finished: Boolean(belongs && trial.status) };
      if (key.trialId !== this.output.trialId || key.finished !== this.output.finished) {
        this.output = key;
        fill(this.outputBox, belongs ? outputView(trial) : null);
      }
      if (this.scrollToFile) {
        this.scrollToFile = false;
        requestAnimationFrame(() => this.panel.scrollIntoView({ block: "start" }));
      }
    } else {
      this.panel.hidden = true;
      this.output = { trialId: null, finished: false };
      fill(this.outputBox);
    }

    const files = filesTable(state, this.view, this.id);
    fill(this.filesToggle, files.toggle);
    fill(this.filesBody, files.content);
    fill(this.slavesBody, slavesTable(state, this.id));
    this.logs.update(state, state.appended);
    state.appended = [];
  }

  /** The parts that move with the clock: the summary (ETA, duration) and the timeline. */
  drawMoving() {
    const { state } = this;
    if (!state.taskset) return;
    fill(this.summaryLive, summary(state));
    this.timeline.draw(state);
  }
}

function crumbs(current) {
  return h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, link("/tasksets", "Tasksets"), h("span", {}, " / "),
    h("span", {}, current));
}

function summary(state) {
  const taskset = state.taskset;
  const now = Date.now();
  let running = 0;
  let queued = 0;
  let retries = 0;
  for (const task of state.tasks.values()) {
    const trials = state.trialsOf(task);
    const status = fileStatus(task, trials, state.active);
    if (status === "running") running += 1;
    if (status === "queued" || status === "retrying") queued += 1;
    retries += Math.max(0, trials.length - 1);
  }
  const counts = { passed: taskset.passed_count, pending: taskset.pending_count, failed: taskset.failed_count };
  const decided = counts.passed + counts.pending + counts.failed;
  const total = taskset.task_count;
  const created = parseTime(taskset.created_at);
  const finished = parseTime(taskset.finished_at);
  const eta = estimate(state, now);
  let when;
  if (finished !== null) {
    when = h("span", {}, `Finished in ${duration(finished - created)}`, h("span", { class: "muted" }, ` · ${localTime(finished)}`));
  } else if (eta) {
    when = h("span", { class: "eta", title: `Estimated from ${eta.basis}, ${eta.slaves} slaves running` },
      `About ${duration(Math.ceil(eta.ms / 1000) * 1000)} left`, h("span", { class: "muted" }, ` · from ${eta.basis}`));
  } else if (state.active) {
    const live = [...state.slaves.values()].some((slave) => !slave.status);
    const waiting = taskset.status === "rsync_waiting" ? "Waiting for the code to be synced" : "Waiting for slaves";
    when = h("span", { class: "muted" }, live ? "Estimating time left…" : waiting);
  }
  const stat = (label, value, kind = null, detail = null) => h("div", { class: ["stat", kind], dataset: { stat: label.toLowerCase() } },
    h("div", { class: "stat-value" }, String(value)), h("div", { class: "stat-label" }, label),
    detail && h("div", { class: "stat-detail" }, detail));
  return [
    h("div", { class: "summary-top" },
      h("div", { class: "summary-progress" },
        h("div", { class: "progress-title" },
          h("span", { class: "fraction big", id: "decided" }, `${decided} / ${total}`),
          h("span", { class: "muted" }, " files decided"),
          h("span", { class: "spacer" }),
          when),
        progressBar({ total, ...counts, running }, { large: true }),
        h("div", { class: "progress-foot" }, countsLine(counts), h("span", { class: "spacer" }),
          h("span", { class: "muted" }, "Duration "), ticking("duration", created, finished)))),
    h("div", { class: "stats" },
      stat("Passed", counts.passed, "passed"),
      stat("Pending", counts.pending, "pending"),
      stat("Failed", counts.failed, "failed"),
      stat("Running", running, "running"),
      stat("Queued", queued),
      stat("Retries", retries, retries ? "retry" : null)),
  ];
}

function commands(taskset) {
  return h("details", { class: "commands" },
    h("summary", {}, "Commands and limits"),
    h("dl", { class: "facts" },
      h("dt", {}, "Setup command"), h("dd", {}, h("pre", { class: "command" }, taskset.setup_command)),
      h("dt", {}, "Slave command"), h("dd", {}, h("pre", { class: "command" }, taskset.slave_command)),
      h("dt", {}, "Max workers"), h("dd", {}, String(taskset.max_workers)),
      h("dt", {}, "Max tries per file"), h("dd", {}, String(taskset.max_trials))));
}
