// A taskset's files: the sortable table (failures first), and one file's trials with their output on demand.

import { get } from "../api.js";
import { duration, h, localTime, parseTime, pathText, plainText, plural, ticking } from "../dom.js";
import { fileStatus, isProblem, trialMs } from "../model.js";
import { empty, failure, link, pill, statusLabel } from "../widgets.js";

const RANK = { failed: 0, retrying: 1, running: 2, queued: 3, not_run: 4, pending: 5, passed: 6 };
const ROW_LIMIT = 300;

/** The rows of the table: each task with what the table shows of it. */
export function fileRows(state, now = Date.now()) {
  const rows = [];
  for (const task of state.tasks.values()) {
    const trials = state.trialsOf(task);
    const status = fileStatus(task, trials, state.active);
    const last = trials[trials.length - 1] || null;
    rows.push({
      task, trials, status, last,
      problem: isProblem(task, trials),
      ms: last ? trialMs(last, now) : null,
      rank: RANK[status] - (isProblem(task, trials) && !["failed", "retrying"].includes(status) ? 0.5 : 0),
    });
  }
  return rows;
}

const SORTS = {
  status: (a, b) => a.rank - b.rank || a.task.spec_path.localeCompare(b.task.spec_path),
  path: (a, b) => a.task.spec_path.localeCompare(b.task.spec_path),
  trials: (a, b) => a.trials.length - b.trials.length || SORTS.status(a, b),
  duration: (a, b) => (a.ms ?? -1) - (b.ms ?? -1) || SORTS.status(a, b),
};

/**
 * The files card's content.
 * @param {object} view  {mode: "failures"|"all", sort, descending, expanded, onChange()}
 */
export function filesTable(state, view, tasksetId) {
  const rows = fileRows(state);
  const problems = rows.filter((row) => row.problem);
  const showAll = view.mode === "all" || problems.length === 0;
  let shown = showAll ? rows : problems;
  shown = [...shown].sort(SORTS[view.sort] || SORTS.status);
  if (view.descending) shown.reverse();

  const toggle = h("div", { class: "segmented", role: "group", "aria-label": "Which files" },
    h("button", {
      type: "button", class: view.mode === "failures" ? "on" : null, "aria-pressed": String(view.mode === "failures"),
      onclick: () => view.onChange({ mode: "failures" }),
    }, "Failures ", h("span", { class: "badge" }, String(problems.length))),
    h("button", {
      type: "button", class: view.mode === "all" ? "on" : null, "aria-pressed": String(view.mode === "all"),
      onclick: () => view.onChange({ mode: "all" }),
    }, "All files ", h("span", { class: "badge" }, String(rows.length))));

  const header = (key, text, cls = null) => {
    const active = view.sort === key;
    return h("th", { class: [cls, "sortable", active && "sorted"], "aria-sort": active ? (view.descending ? "descending" : "ascending") : null },
      h("button", {
        type: "button",
        onclick: () => view.onChange(active ? { descending: !view.descending } : { sort: key, descending: false }),
      }, text, h("span", { class: "arrow" }, active ? (view.descending ? " ↓" : " ↑") : "")));
  };

  const visible = view.expanded ? shown : shown.slice(0, ROW_LIMIT);
  const note = view.mode === "failures" && problems.length === 0 && rows.length
    ? h("p", { class: "hint" }, "No failures so far: every file is listed.")
    : null;
  const body = rows.length === 0
    ? empty("This taskset has no files")
    : h("div", { class: "table-wrap" }, h("table", { class: "files" },
      h("thead", {}, h("tr", {},
        header("status", "Status"), header("path", "File", "wide"), header("trials", "Trials", "hide-sm"),
        header("duration", "Duration", "num"))),
      h("tbody", {}, visible.map((row) => fileRow(row, tasksetId)))));
  const more = shown.length > visible.length
    ? h("button", { type: "button", class: "link-button", onclick: () => view.onChange({ expanded: true }) },
      `Show ${plural(shown.length - visible.length, "more file")}`)
    : null;
  return { toggle, content: [note, body, more] };
}

function fileRow(row, tasksetId) {
  const { task, trials, status, last } = row;
  const target = last && last.status ? `/tasksets/${tasksetId}/files/${task.id}/trials/${last.id}`
    : `/tasksets/${tasksetId}/files/${task.id}`;
  const running = last && !last.status;
  return h("tr", {
    class: "clickable", dataset: { taskId: String(task.id), status },
    onclick: (event) => {
      if (event.target.closest("a") || window.getSelection().toString()) return;
      window.location.hash = target;
    },
  },
  h("td", {}, pill(status), row.problem && status === "passed" ? h("span", { class: "flaky", title: "passed after a failed try" }, "flaky") : null),
  h("td", { class: "wide path" }, link(target, ...pathText(task.spec_path))),
  h("td", { class: "hide-sm" }, trialDots(trials)),
  h("td", { class: "num" }, running
    ? ticking("duration", parseTime(last.started_at) ?? parseTime(last.created_at))
    : duration(row.ms)));
}

export function trialDots(trials) {
  if (trials.length === 0) return h("span", { class: "muted" }, "—");
  return h("span", { class: "dots", title: trials.map((t) => statusLabel(t.status || "running")).join(", ") },
    trials.map((trial) => h("span", { class: "dot", dataset: { status: trial.status || "running" } })));
}

// -- one file ---------------------------------------------------------------------------

const outputs = new Map(); // trial id → Promise of the trial with its output (finished trials only)
const KEEP_OUTPUTS = 20;

function loadOutput(trialId) {
  if (!outputs.has(trialId)) {
    if (outputs.size >= KEEP_OUTPUTS) outputs.delete(outputs.keys().next().value);
    const request = get(`/trials/${trialId}`).then((trial) => {
      if (!trial.status) outputs.delete(trialId);
      return trial;
    }, (error) => {
      outputs.delete(trialId);
      throw error;
    });
    outputs.set(trialId, request);
  }
  return outputs.get(trialId);
}

/** The top of one file's panel (all but the output): what it is and its trials. Null for an unknown file. */
export function filePanelTop(state, taskId, trialId, tasksetId) {
  const task = state.tasks.get(taskId);
  const close = link(`/tasksets/${tasksetId}`, "Close ✕");
  close.classList.add("close");
  if (!task) {
    return [h("div", { class: "section-head" }, h("h2", {}, "File"), close),
      h("div", { class: "notice" }, `This taskset has no file ${taskId}.`)];
  }
  const trials = state.trialsOf(task);
  const status = fileStatus(task, trials, state.active);
  const history = state.averages.get(task.spec_sha1);
  const rows = trials.map((trial, index) => {
    const slave = state.slaves.get(trial.slave_id);
    const chosen = trial.id === trialId;
    const href = `/tasksets/${tasksetId}/files/${task.id}/trials/${trial.id}`;
    return h("tr", { class: [chosen && "chosen", "clickable"], dataset: { trialId: String(trial.id) },
      onclick: (event) => {
        if (!event.target.closest("a")) window.location.hash = href;
      } },
    h("td", {}, String(index + 1)),
    h("td", {}, pill(trial.status || "running")),
    h("td", { class: "mono" }, slave ? slave.name : `slave ${trial.slave_id}`),
    h("td", { class: "hide-sm muted" }, localTime(parseTime(trial.started_at) ?? parseTime(trial.created_at))),
    h("td", { class: "num" }, trial.status
      ? duration(trialMs(trial))
      : ticking("duration", parseTime(trial.started_at) ?? parseTime(trial.created_at))),
    h("td", { class: "num hide-sm" }, trial.status ? testCounts(trial) : "—"),
    h("td", { class: "num" }, chosen ? h("span", { class: "muted" }, "shown below") : link(href, "Output")));
  });
  return [
    h("div", { class: "section-head" }, h("h2", { class: "path" }, ...pathText(task.spec_path)), pill(status), close),
    h("dl", { class: "facts" },
      fact("Tries", `${trials.length} of at most ${state.taskset.max_trials}`),
      fact("Soft / hard timeout", `${task.soft_timeout_sec} s / ${task.hard_timeout_sec} s`),
      fact("Usually takes", history === null || history === undefined ? "no history yet" : duration(history * 1000)),
      fact("SHA-1", h("code", {}, task.spec_sha1 || "—"))),
    trials.length
      ? h("div", { class: "table-wrap" }, h("table", { class: "trials" },
        h("thead", {}, h("tr", {}, h("th", {}, "Try"), h("th", {}, "Status"), h("th", {}, "Slave"),
          h("th", { class: "hide-sm" }, "Started"), h("th", { class: "num" }, "Duration"),
          h("th", { class: "num hide-sm" }, "Tests"), h("th", {}, ""))),
        h("tbody", {}, rows)))
      : empty("Not run yet", "It is waiting in the queue."),
    !trials.some((t) => t.id === trialId) && trials.some((t) => t.status)
      ? h("p", { class: "hint" }, "Choose a try to see what it printed.") : null,
  ];
}

function fact(term, value) {
  return [h("dt", {}, term), h("dd", {}, value)];
}

function testCounts(trial) {
  const parts = [];
  if (trial.passed) parts.push(h("span", { class: "count passed" }, `${trial.passed} ✓`));
  if (trial.pending) parts.push(h("span", { class: "count pending" }, `${trial.pending} ○`));
  if (trial.failed) parts.push(h("span", { class: "count failed" }, `${trial.failed} ✗`));
  return parts.length ? h("span", { class: "counts" }, parts) : h("span", { class: "muted" }, "—");
}

/** A trial's stdout and stderr, fetched once it has finished. */
export function outputView(trial) {
  const box = h("div", { class: "output", dataset: { trialId: String(trial.id) } });
  if (!trial.status) {
    box.append(h("p", { class: "hint" }, "This try is still running; its output arrives when it finishes."));
    return box;
  }
  box.append(h("div", { class: "loading" }, "Loading output…"));
  loadOutput(trial.id).then((full) => {
    box.replaceChildren(stream("stdout", full.stdout), stream("stderr", full.stderr));
  }, (error) => {
    box.replaceChildren(failure(error));
  });
  return box;
}

function stream(name, text) {
  const clean = plainText(text);
  const lines = clean ? clean.split("\n").length - (clean.endsWith("\n") ? 1 : 0) : 0;
  const failingLine = /(^|\n)(E |FAILED|ERROR|Traceback)/.test(clean);
  return h("div", { class: ["stream", name, failingLine && "has-errors"] },
    h("div", { class: "stream-head" }, h("span", { class: "stream-name" }, name),
      h("span", { class: "muted" }, clean ? plural(lines, "line") : "empty")),
    clean ? h("pre", { class: "log" }, clean) : null);
}

