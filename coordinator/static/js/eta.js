// How long a running taskset still needs, from history averages and the durations seen in this run.

import { parseTime } from "./dom.js";
import { trialMs } from "./model.js";

/**
 * @returns {{ms: number, basis: string, slaves: number} | null}  null when there is nothing to go on
 */
export function estimate(state, now = Date.now()) {
  if (!state.active) return null;
  const observed = [];
  for (const trial of state.trials.values()) {
    if (trial.status === "passed" || trial.status === "pending") {
      const ms = trialMs(trial, now);
      if (ms !== null) observed.push(ms);
    }
  }
  const observedMean = observed.length ? observed.reduce((a, b) => a + b, 0) / observed.length : null;
  let known = 0;
  let fromHistory = 0;
  let unknown = 0;
  let totalMs = 0;
  let longestMs = 0;
  for (const task of state.tasks.values()) {
    if (task.status) continue;
    const history = state.averages.get(task.spec_sha1);
    let expected = null;
    if (history !== null && history !== undefined) {
      expected = history * 1000;
      fromHistory += 1;
    } else if (observedMean !== null) {
      expected = observedMean;
    }
    if (expected === null) {
      unknown += 1;
      continue;
    }
    known += 1;
    const running = state.trialsOf(task).filter((trial) => !trial.status);
    if (running.length) {
      const started = Math.min(...running.map((t) => parseTime(t.started_at) ?? parseTime(t.created_at) ?? now));
      expected = Math.max(expected - (now - started), 1000);
    }
    totalMs += expected;
    longestMs = Math.max(longestMs, expected);
  }
  if (known === 0) return null;
  if (unknown) totalMs += (totalMs / known) * unknown;
  const slaves = [...state.slaves.values()].filter((slave) => !slave.status).length;
  if (slaves === 0) return null;
  return {
    ms: Math.max(totalMs / slaves, longestMs),
    basis: fromHistory >= known / 2 ? "history" : "this run",
    slaves,
  };
}
