// How long a running taskset still needs, from history averages and the durations seen in this run.

import { parseTime } from "./dom.js";
import { trialMs } from "./model.js";

/** History is in whole seconds, rounded down: a file under a second counts as half of one. */
function historyMs(seconds) {
  return Math.max(seconds, 0.5) * 1000;
}

/** How much slower (> 1) or faster this run goes than history says, from the files it has finished. */
function paceAgainstHistory(state, now) {
  let observed = 0;
  let expected = 0;
  let samples = 0;
  for (const task of state.tasks.values()) {
    const history = state.averages.get(task.spec_sha1);
    if (history === null || history === undefined) continue;
    for (const trial of state.trialsOf(task)) {
      if (trial.status !== "passed" && trial.status !== "pending") continue;
      const ms = trialMs(trial, now);
      if (ms === null) continue;
      observed += ms;
      expected += historyMs(history);
      samples += 1;
    }
  }
  return samples >= 3 && expected > 0 ? observed / expected : 1;
}

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
  const pace = paceAgainstHistory(state, now);
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
      expected = historyMs(history) * pace;
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
