// A taskset as the dashboard knows it: loaded from /api/v1, then changed by notifications.
//
// Every change is applied so that an older notification cannot undo a newer state: statuses only move
// forward, counts only grow, records are keyed by id. A notification replayed after a resync is then harmless.

import { parseTime } from "./dom.js";

export const ACTIVE = new Set(["rsync_waiting", "waiting", "running"]);
const TASKSET_ORDER = { rsync_waiting: 0, waiting: 1, running: 2, succeeded: 3, failed: 3, cancelled: 3 };
const COUNTS = ["task_count", "passed_count", "pending_count", "failed_count"];
export const FAILING_TRIALS = new Set(["failed", "error", "timeout"]);

export function refId(ref) {
  if (Array.isArray(ref)) return Number(ref[1]);
  return ref === null || ref === undefined ? null : Number(ref);
}

/** Merge a taskset `hash` (or a fetched record) into `taskset` without going backwards. */
export function mergeTaskset(taskset, hash) {
  if (hash.status !== undefined && hash.status !== taskset.status) {
    const from = TASKSET_ORDER[taskset.status] ?? -1;
    const to = TASKSET_ORDER[hash.status] ?? -1;
    if (to > from) taskset.status = hash.status;
  }
  if (hash.finished_at) taskset.finished_at = hash.finished_at;
  for (const key of COUNTS) {
    if (typeof hash[key] === "number") taskset[key] = Math.max(taskset[key] ?? 0, hash[key]);
  }
  for (const [key, value] of Object.entries(hash)) {
    if (!(key in taskset)) taskset[key] = value;
  }
  return taskset;
}

export class TasksetState {
  constructor(id) {
    this.id = id;
    this.taskset = null;
    this.tasks = new Map();
    this.trials = new Map();
    this.slaves = new Map();
    this.workerLogs = new Map();
    this.averages = new Map(); // spec_sha1 → seconds from history, or null
    this.appended = []; // [worker log id, text] of the last batch of applied notes, for incremental log views
  }

  /** Replace everything with a fresh load (records fetched from /api/v1). */
  load({ taskset, tasks, slaves, workerLogs }) {
    const previous = this.taskset;
    this.taskset = previous ? mergeTaskset({ ...taskset }, previous) : taskset;
    this.tasks = new Map();
    this.trials = new Map();
    for (const task of tasks) {
      const trialIds = [];
      for (const trial of task.trials || []) {
        this.trials.set(trial.id, trial);
        trialIds.push(trial.id);
      }
      const { trials, ...rest } = task;
      this.tasks.set(task.id, { ...rest, trialIds });
    }
    this.slaves = new Map(slaves.map((slave) => [slave.id, { ...slave, current_trial: refId(slave.current_trial) }]));
    this.workerLogs = new Map(workerLogs.map((log) => [log.id, log]));
  }

  /** Apply one TasksetNotification; returns false for a method this state does not know. */
  apply(method, params) {
    switch (method) {
      case "taskset_updated": {
        const [, ref, hash] = params;
        if (refId(ref) === this.id && this.taskset) mergeTaskset(this.taskset, hash || {});
        return true;
      }
      case "task_updated": {
        const [, ref, hash] = params;
        const task = this.tasks.get(refId(ref));
        if (!task || !hash) return true;
        if (hash.status && !task.status) task.status = hash.status;
        if (typeof hash.trial_count === "number") task.trial_count = Math.max(task.trial_count, hash.trial_count);
        return true;
      }
      case "trial_created": {
        const [, trialRef, taskRef, slaveRef, createdAt] = params;
        const id = refId(trialRef);
        const task = this.tasks.get(refId(taskRef));
        if (!this.trials.has(id)) {
          this.trials.set(id, {
            id, task_id: refId(taskRef), slave_id: refId(slaveRef), status: null, created_at: createdAt,
            started_at: null, finished_at: null, passed: null, pending: null, failed: null,
          });
        }
        if (task && !task.trialIds.includes(id)) {
          task.trialIds.push(id);
          task.trial_count = Math.max(task.trial_count, task.trialIds.length);
        }
        return true;
      }
      case "trial_updated": {
        const [, trialRef, taskRef, finishedAt, status, passed, pending, failed] = params;
        const id = refId(trialRef);
        let trial = this.trials.get(id);
        if (!trial) {
          trial = { id, task_id: refId(taskRef), slave_id: null, status: null, created_at: finishedAt, started_at: null };
          this.trials.set(id, trial);
          const task = this.tasks.get(refId(taskRef));
          if (task && !task.trialIds.includes(id)) task.trialIds.push(id);
        }
        if (trial.status === null || trial.status === undefined) {
          Object.assign(trial, { status, finished_at: finishedAt, passed, pending, failed });
        }
        return true;
      }
      case "worker_log_created": {
        const [timestamp, ref, workerName] = params;
        const id = refId(ref);
        if (!this.workerLogs.has(id)) {
          this.workerLogs.set(id, {
            id, taskset_id: this.id, worker_name: workerName, started_at: timestamp, rsync_finished_at: null,
            setup_finished_at: null, rspec_finished_at: null, finished_at: null, log: "",
          });
        }
        return true;
      }
      case "worker_log_updated": {
        const [, ref, hash] = params;
        const log = this.workerLogs.get(refId(ref));
        if (!log || !hash) return true;
        for (const [key, value] of Object.entries(hash)) {
          if (key === "log_appended") {
            log.log += value;
            this.appended.push([log.id, value]);
          } else if (value !== null) {
            log[key] = value;
          }
        }
        return true;
      }
      case "slave_created": {
        const [, ref, name] = params;
        const id = refId(ref);
        if (!this.slaves.has(id)) {
          this.slaves.set(id, { id, taskset_id: this.id, name, status: null, current_trial: null });
        }
        return true;
      }
      case "slave_updated": {
        const [, ref, hash] = params;
        const slave = this.slaves.get(refId(ref));
        if (!slave || !hash) return true;
        if (hash.status !== undefined && hash.status !== null) slave.status = hash.status;
        if (hash.current_trial !== undefined) slave.current_trial = refId(hash.current_trial);
        return true;
      }
      default:
        return false;
    }
  }

  /**
   * Apply notifications held while the state was being fetched. The fetched worker logs may already hold
   * some of their appends (those committed before the fetch read them, always the first ones): skip the
   * longest run of them that the fetched text already ends with.
   */
  replay(notes) {
    const appends = new Map();
    notes.forEach(([method, params], index) => {
      if (method === "worker_log_updated" && params[2] && typeof params[2].log_appended === "string") {
        const id = refId(params[1]);
        if (!appends.has(id)) appends.set(id, []);
        appends.get(id).push(index);
      }
    });
    const skip = new Set();
    for (const [id, indexes] of appends) {
      const log = this.workerLogs.get(id);
      if (!log) continue;
      for (let k = indexes.length; k > 0; k -= 1) {
        const text = indexes.slice(0, k).map((i) => notes[i][1][2].log_appended).join("");
        if (log.log.endsWith(text)) {
          indexes.slice(0, k).forEach((i) => skip.add(i));
          break;
        }
      }
    }
    notes.forEach(([method, params], index) => {
      if (!skip.has(index)) {
        this.apply(method, params);
        return;
      }
      const hash = { ...params[2] };
      delete hash.log_appended;
      this.apply(method, [params[0], params[1], hash]);
    });
  }

  trialsOf(task) {
    return task.trialIds.map((id) => this.trials.get(id)).filter(Boolean);
  }

  get active() {
    return this.taskset !== null && ACTIVE.has(this.taskset.status);
  }
}

/** What a file shows as its status: its verdict, else what its trials are doing. */
export function fileStatus(task, trials, tasksetActive) {
  if (task.status) return task.status;
  if (trials.some((trial) => !trial.status)) return "running";
  if (!tasksetActive) return "not_run";
  if (trials.length > 0) return "retrying";
  return "queued";
}

/** A file that failed, or needed more than one try. */
export function isProblem(task, trials) {
  return task.status === "failed" || trials.some((trial) => FAILING_TRIALS.has(trial.status));
}

/** Milliseconds a trial ran (or has been running, with `now`); null if it has not started. */
export function trialMs(trial, now = Date.now()) {
  const start = parseTime(trial.started_at) ?? parseTime(trial.created_at);
  if (start === null) return null;
  const end = parseTime(trial.finished_at) ?? (trial.status ? null : now);
  return end === null ? null : end - start;
}
