"""Following a taskset to its end over `/ws`: notifications feed the display, summaries resync it.

The peer reconnects by itself when the coordinator restarts; every new connection listens again and
asks for the summary, so nothing missed while disconnected changes what the client ends up knowing.
Only a coordinator unreachable for longer than `disconnect_timeout_s` ends the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Final

from coordinator.cli.client import Client, CoordinatorUnavailable
from coordinator.cli.progress import Display, RunState
from protocol.messages import (
    ActiveWorker,
    Params,
    TasksetSummary,
    TasksetUpdated,
    TaskUpdated,
    TrialCreated,
    TrialUpdated,
)
from protocol.peer import Peer
from protocol.types import UNSET, TasksetRef, TasksetStatus

FINISHED: Final = frozenset({TasksetStatus.SUCCEEDED, TasksetStatus.FAILED, TasksetStatus.CANCELLED})
RESYNC_EVERY_S: Final = 10.0
TICK_S: Final = 0.5
CONNECT_TIMEOUT_S: Final = 30.0
WHY_WAITING_EVERY_S: Final = 5.0
"""How long a taskset waits for its first worker before the client asks why, and then how often."""
FAILED_TRIAL_STATUSES: Final = frozenset({"failed", "error", "timeout"})


@dataclass
class _Seen:
    """Trials that notifications started, ended or failed while a read of all trials was on its way."""

    started: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)


class Follower:
    """Tracks one taskset until it is finished; `wait()` returns its final status."""

    def __init__(self, client: Client, ref: TasksetRef, display: Display, *, disconnect_timeout_s: float) -> None:
        self.client = client
        self.ref = ref
        self.display = display
        self.disconnect_timeout_s = disconnect_timeout_s
        self.state = RunState()
        self.paths: dict[int, str] = {}
        self.finished = asyncio.Event()
        self._failed_seen: set[int] = set()
        self._failed_trials: set[int] = set()
        self._peer: Peer | None = None
        self.worker_type: str | None = None
        self._why_waiting: str | None = None
        self._seen: _Seen | None = None

    # -- what the coordinator tells -----------------------------------------------------

    def on_notification(self, method: str, params: Params) -> None:
        state = self.state
        if isinstance(params, TasksetUpdated):
            if params.taskset_ref.id != self.ref.id:
                return
            hash_ = params.hash
            if hash_.status is not UNSET:
                state.status = hash_.status
            counts: dict[str, Any] = {
                name: getattr(hash_, name)
                for name in ("task_count", "passed_count", "pending_count", "failed_count")
                if getattr(hash_, name) is not UNSET
            }
            state.apply_counts(counts)
            if state.status in FINISHED:
                self.finished.set()
        elif isinstance(params, TaskUpdated):
            status = params.hash.status
            task_id = params.task_ref.id
            if status == "failed" and task_id not in self._failed_seen:
                self._failed_seen.add(task_id)
                self.display.note(f"FAILED {self.paths.get(task_id, f'task {task_id}')}")
        elif isinstance(params, TrialCreated):
            state.running.add(params.trial_ref.id)
            if self._seen is not None:
                self._seen.started.add(params.trial_ref.id)
        elif isinstance(params, TrialUpdated):
            if params.finished_at is not None or params.trial_status is not None:
                state.running.discard(params.trial_ref.id)
                if self._seen is not None:
                    self._seen.ended.add(params.trial_ref.id)
            if params.trial_status in FAILED_TRIAL_STATUSES and params.trial_ref.id not in self._failed_trials:
                self._failed_trials.add(params.trial_ref.id)
                state.failed_trials = len(self._failed_trials)
                if self._seen is not None:
                    self._seen.failed.add(params.trial_ref.id)

    def apply_summary(self, summary: TasksetSummary) -> None:
        self.state.status = summary.status
        self.state.apply_counts(
            {
                "task_count": summary.task_count,
                "passed_count": summary.passed_count,
                "pending_count": summary.pending_count,
                "failed_count": summary.failed_count,
            }
        )
        if summary.status in FINISHED:
            self.finished.set()

    async def _on_connect(self) -> None:
        assert self._peer is not None
        await self._peer.call("listen_to_taskset", self.ref)
        self.apply_summary(await self._peer.call("query_taskset_summary", self.ref))
        # Trials that started or ended while no connection listened (before the first one too, for a
        # taskset followed once running): the summary does not count them. What notifications say while
        # the read is on its way may be newer than what it returns: it is kept and applied on top.
        self._seen = _Seen()
        try:
            body = await self.client.get_json(f"/api/v1/tasksets/{self.ref.id}/tasks")
            seen = self._seen
        finally:
            self._seen = None
        self.apply_trials(body, seen)

    def apply_trials(self, body: Any, seen: _Seen | None = None) -> None:
        """The running trials and the failed attempts from the read API's tasks, with what notifications
        said meanwhile (`seen`) on top."""
        seen = seen or _Seen()
        running: set[int] = set(seen.started)
        failed: set[int] = set(seen.failed)
        for task in body["tasks"]:
            for trial in task.get("trials", ()):
                if trial.get("finished_at") is None and trial.get("status") is None:
                    running.add(int(trial["id"]))
                elif trial.get("status") in FAILED_TRIAL_STATUSES:
                    failed.add(int(trial["id"]))
        self.state.running = running - seen.ended
        self._failed_trials = failed
        self.state.failed_trials = len(failed)

    # -- the wait ---------------------------------------------------------------------

    async def load_paths(self) -> None:
        body = await self.client.get_json(f"/api/v1/tasksets/{self.ref.id}/tasks")
        self.paths = {int(task["id"]): str(task["spec_path"]) for task in body["tasks"]}
        self.state.task_count = len(self.paths)
        taskset = await self.client.get_json(f"/api/v1/tasksets/{self.ref.id}")
        self.worker_type = str(taskset["worker_type"])

    def why_waiting(self, workers: list[ActiveWorker]) -> str | None:
        """What keeps a dispatched taskset from its first worker, when the live workers tell."""
        of_type = [worker for worker in workers if worker.worker_type == self.worker_type]
        if not of_type:
            return (
                f"testfleet: no worker of type {self.worker_type!r} is connected to the coordinator; "
                "the taskset waits for one"
            )
        if all(worker.taskset_ref is not None and worker.taskset_ref.id != self.ref.id for worker in of_type):
            who = (
                f"the {len(of_type)} workers of type {self.worker_type!r} are"
                if len(of_type) > 1
                else (f"the one worker of type {self.worker_type!r} is")
            )
            return f"testfleet: {who} busy with other tasksets; the taskset waits"
        return None

    async def _say_why_waiting(self, peer: Peer) -> None:
        why = self.why_waiting(await peer.call("active_workers", timeout=WHY_WAITING_EVERY_S))
        if why is not None and why != self._why_waiting and self.state.status == TasksetStatus.WAITING:
            self.display.note(why)
        self._why_waiting = why

    async def wait(self) -> TasksetStatus:
        """Follow the taskset until it is finished; `CoordinatorUnavailable` when the coordinator stays away."""
        await self.load_paths()
        self._peer = peer = Peer(
            self.client.url,
            token=self.client.token,
            on_notification=self.on_notification,
            on_connect=self._on_connect,
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        try:
            await peer.start()
        except (TimeoutError, OSError) as exc:
            raise CoordinatorUnavailable(f"no WebSocket connection to {self.client.url}: {exc}") from exc
        try:
            return await self._watch(peer)
        finally:
            # Also when interrupted: a live display must give the terminal back (cursor, last line).
            self.display.close(self.state)
            await peer.close()

    async def _watch(self, peer: Peer) -> TasksetStatus:
        last_resync = last_asked = time.monotonic()
        lost_since: float | None = None
        while not self.finished.is_set():
            self.display.refresh(self.state)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), TICK_S)
            now = time.monotonic()
            if not peer.connected:
                if lost_since is None:
                    lost_since = now
                    self.display.note(f"testfleet: lost the coordinator at {self.client.url}; reconnecting")
                if now - lost_since > self.disconnect_timeout_s:
                    raise CoordinatorUnavailable(
                        f"the coordinator at {self.client.url} has been unreachable for {now - lost_since:.0f}s"
                    )
                continue
            if lost_since is not None:
                self.display.note(f"testfleet: reconnected after {now - lost_since:.0f}s; following again")
                lost_since = None
            if self.state.status == TasksetStatus.WAITING and now - last_asked >= WHY_WAITING_EVERY_S:
                last_asked = now
                with contextlib.suppress(Exception):  # only a note: the next ask, or the run, says more
                    await self._say_why_waiting(peer)
            if now - last_resync >= RESYNC_EVERY_S:
                last_resync = now
                try:
                    self.apply_summary(await peer.call("query_taskset_summary", self.ref, timeout=RESYNC_EVERY_S))
                except Exception:  # noqa: S112 - the next tick or reconnect resyncs
                    continue
        self.state.running.clear()  # a speculative duplicate may still run; it changes nothing now
        return TasksetStatus(self.state.status)
