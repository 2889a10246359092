-- name: set_taskset_status
-- A taskset's new status and its finish time.
UPDATE tasksets SET status = $2, finished_at = $3 WHERE id = $1;

-- name: insert_trial
-- A new trial, not started yet.
INSERT INTO trials (id, task_id, slave_id, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING;

-- name: start_trial
-- The moment a trial started running.
UPDATE trials SET started_at = $2 WHERE id = $1 AND started_at IS NULL;

-- name: finish_trial
-- A trial's result.
UPDATE trials SET status = $2, stdout = $3, stderr = $4, passed = $5, pending = $6, failed = $7, finished_at = $8
WHERE id = $1;

-- name: insert_spec_sample
-- One passed or pending run's duration, for scheduling by history.
INSERT INTO spec_samples (taskset_class, spec_sha1, spec_path, duration_ms) VALUES ($1, $2, $3, $4);

-- name: set_task_status
-- A task's verdict.
UPDATE tasks SET status = $2 WHERE id = $1;

-- name: insert_worker_log
-- A worker's log for one taskset.
INSERT INTO worker_logs (id, taskset_id, worker_name, started_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING;

-- name: append_worker_log
-- More text at the end of a worker log.
UPDATE worker_logs SET log = log || $2 WHERE id = $1;

-- name: set_worker_log_rsync_finished_at
-- The end of the worker's code sync.
UPDATE worker_logs SET rsync_finished_at = $2 WHERE id = $1;

-- name: set_worker_log_setup_finished_at
-- The end of the worker's setup command.
UPDATE worker_logs SET setup_finished_at = $2 WHERE id = $1;

-- name: set_worker_log_rspec_finished_at
-- The end of the worker's slave phase.
UPDATE worker_logs SET rspec_finished_at = $2 WHERE id = $1;

-- name: set_worker_log_finished_at
-- The end of the worker's whole part in the taskset.
UPDATE worker_logs SET finished_at = $2 WHERE id = $1;

-- name: insert_slave
-- A slave of a taskset.
INSERT INTO slaves (id, taskset_id, name, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING;

-- name: set_slave_current_trial
-- What a slave runs now.
UPDATE slaves SET current_trial_id = $2 WHERE id = $1;

-- name: set_slave_status
-- How a slave ended.
UPDATE slaves SET status = $2 WHERE id = $1;

-- name: next_taskset_id
-- A fresh taskset id.
SELECT nextval('tasksets_id_seq');

-- name: next_id_block
-- The first id of a fresh block of ids from a sequence whose increment is the block size.
SELECT nextval($1::regclass);

-- name: insert_taskset
-- A new taskset.
INSERT INTO tasksets (id, rsync_name, setup_command, slave_command, worker_type, taskset_class, max_workers,
                      max_trials, status, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'rsync_waiting', $9);

-- name: insert_task
-- A task of a new taskset.
INSERT INTO tasks (id, taskset_id, position, spec_path, spec_sha1, hard_timeout_sec, soft_timeout_sec)
VALUES ($1, $2, $3, $4, $5, $6, $7);

-- name: active_taskset_ids
-- Tasksets that are not finished, oldest first.
SELECT id FROM tasksets WHERE status IN ('rsync_waiting', 'waiting', 'running') ORDER BY id;

-- name: finished_taskset_ids_with_unfinished_slaves
-- Finished tasksets with a slave that has no final status (a restart came before it was lost).
SELECT DISTINCT s.taskset_id AS id
FROM slaves s JOIN tasksets t ON t.id = s.taskset_id
WHERE s.status IS NULL AND t.status NOT IN ('rsync_waiting', 'waiting', 'running')
ORDER BY s.taskset_id;

-- name: taskset_has_open_trial
-- Whether a trial of the taskset is still open.
SELECT EXISTS (SELECT 1 FROM tasks t JOIN trials x ON x.task_id = t.id WHERE t.taskset_id = $1 AND x.status IS NULL);

-- name: end_unfinished_slaves
-- A finished taskset with no trial open: its slaves that never said how they ended are gone (as lost).
UPDATE slaves SET status = 'failure_exit' WHERE taskset_id = $1 AND status IS NULL;

-- name: active_taskset_ids_of_rsync_name
-- The unfinished tasksets of one rsync_name.
SELECT id FROM tasksets WHERE rsync_name = $1 AND status IN ('rsync_waiting', 'waiting', 'running') ORDER BY id;

-- name: get_taskset
-- One taskset's row.
SELECT id, rsync_name, setup_command, slave_command, worker_type, taskset_class, max_workers, max_trials, status,
       created_at, finished_at
FROM tasksets WHERE id = $1;

-- name: tasks_of_taskset
-- A taskset's tasks in submission order.
SELECT t.id, t.taskset_id, t.position, t.spec_path, t.spec_sha1, t.hard_timeout_sec, t.soft_timeout_sec, t.status,
       (SELECT count(*) FROM trials r WHERE r.task_id = t.id) AS trial_count
FROM tasks t WHERE t.taskset_id = $1 ORDER BY t.position;

-- name: tasks_json_of_taskset
-- The read API's `{"tasks": [...]}` of a taskset, each task with its trials (no outputs), as JSON text built
-- here rather than on the coordinator's event loop (a taskset of 100,000 tasks is 17 MB of it). Timestamps
-- as the protocol writes them: UTC, microseconds, `Z`.
SELECT json_build_object('tasks', coalesce(json_agg(json_build_object(
    'id', t.id, 'taskset_id', t.taskset_id, 'spec_path', t.spec_path, 'spec_sha1', t.spec_sha1,
    'hard_timeout_sec', t.hard_timeout_sec, 'soft_timeout_sec', t.soft_timeout_sec, 'status', t.status,
    'trial_count', r.count, 'trials', coalesce(r.list, '[]'::json)
) ORDER BY t.position), '[]'::json))::text
FROM tasks t
LEFT JOIN LATERAL (
    SELECT count(*) AS count, json_agg(json_build_object(
        'id', x.id, 'task_id', x.task_id, 'slave_id', x.slave_id, 'status', x.status,
        'created_at', to_char(x.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'started_at', to_char(x.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'finished_at', to_char(x.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'passed', x.passed, 'pending', x.pending, 'failed', x.failed
    ) ORDER BY x.id) AS list
    FROM trials x WHERE x.task_id = t.id
) r ON true
WHERE t.taskset_id = $1;

-- name: trials_of_taskset
-- A taskset's trials without their output.
SELECT r.id, r.task_id, r.slave_id, r.status, r.created_at, r.started_at, r.finished_at, r.passed, r.pending,
       r.failed
FROM trials r JOIN tasks t ON t.id = r.task_id WHERE t.taskset_id = $1 ORDER BY r.id;

-- name: slaves_of_taskset
-- A taskset's slaves.
SELECT id, taskset_id, name, status, current_trial_id, created_at FROM slaves WHERE taskset_id = $1 ORDER BY id;

-- name: worker_logs_of_taskset
-- A taskset's worker logs with their text.
SELECT id, taskset_id, worker_name, log, started_at, rsync_finished_at, setup_finished_at, rspec_finished_at,
       finished_at
FROM worker_logs WHERE taskset_id = $1 ORDER BY id;

-- name: get_trial
-- One trial with its output.
SELECT r.id, r.task_id, r.slave_id, r.status, r.created_at, r.started_at, r.finished_at, r.passed, r.pending,
       r.failed, r.stdout, r.stderr, t.taskset_id, t.spec_path
FROM trials r JOIN tasks t ON t.id = r.task_id WHERE r.id = $1;

-- name: taskset_of_task
-- The taskset a task belongs to.
SELECT taskset_id FROM tasks WHERE id = $1;

-- name: taskset_of_trial
-- The taskset a trial belongs to.
SELECT t.taskset_id FROM trials r JOIN tasks t ON t.id = r.task_id WHERE r.id = $1;

-- name: taskset_of_slave
-- The taskset a slave belongs to.
SELECT taskset_id FROM slaves WHERE id = $1;

-- name: taskset_of_worker_log
-- The taskset a worker log belongs to.
SELECT taskset_id FROM worker_logs WHERE id = $1;

-- name: slave_by_name
-- The newest slave with that name.
SELECT id, taskset_id FROM slaves WHERE name = $1 ORDER BY id DESC LIMIT 1;

-- name: task_counts
-- A taskset's task counts by status.
SELECT count(*) AS task_count,
       count(*) FILTER (WHERE status = 'passed') AS passed_count,
       count(*) FILTER (WHERE status = 'pending') AS pending_count,
       count(*) FILTER (WHERE status = 'failed') AS failed_count
FROM tasks WHERE taskset_id = $1;

-- name: list_tasksets
-- Tasksets newest first, optionally only active or only finished ones, before an id.
SELECT s.id, s.rsync_name, s.setup_command, s.slave_command, s.worker_type, s.taskset_class, s.max_workers,
       s.max_trials, s.status, s.created_at, s.finished_at,
       c.task_count, c.passed_count, c.pending_count, c.failed_count
FROM tasksets s
CROSS JOIN LATERAL (
    SELECT count(*) AS task_count,
           count(*) FILTER (WHERE status = 'passed') AS passed_count,
           count(*) FILTER (WHERE status = 'pending') AS pending_count,
           count(*) FILTER (WHERE status = 'failed') AS failed_count
    FROM tasks WHERE taskset_id = s.id
) c
WHERE ($1::boolean IS NULL OR (s.status IN ('rsync_waiting', 'waiting', 'running')) = $1)
  AND ($2::bigint IS NULL OR s.id < $2)
ORDER BY s.id DESC LIMIT $3;

-- name: averages_by_sha1
-- Mean milliseconds of the latest 100 passed/pending runs per sha1 of one taskset class.
SELECT k.sha1, (SELECT avg(d.duration_ms) FROM (
           SELECT duration_ms FROM spec_samples
           WHERE taskset_class = $1 AND spec_sha1 = k.sha1 ORDER BY id DESC LIMIT 100) d) AS avg_ms
FROM unnest($2::text[]) AS k(sha1);

-- name: averages_by_path
-- Mean milliseconds of the latest 100 passed/pending runs per path of one taskset class.
SELECT k.path, (SELECT avg(d.duration_ms) FROM (
           SELECT duration_ms FROM spec_samples
           WHERE taskset_class = $1 AND spec_path = k.path ORDER BY id DESC LIMIT 100) d) AS avg_ms
FROM unnest($2::text[]) AS k(path);

-- name: trim_spec_samples
-- Delete up to $1 samples in neither the latest 100 of their sha1 nor those of their path; returns how many.
WITH old_by_sha1 AS (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY taskset_class, spec_sha1 ORDER BY id DESC) AS n
        FROM spec_samples) r
    WHERE n > 100
), old_by_path AS (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY taskset_class, spec_path ORDER BY id DESC) AS n
        FROM spec_samples) r
    WHERE n > 100
), deleted AS (
    DELETE FROM spec_samples WHERE id IN (SELECT id FROM old_by_sha1 JOIN old_by_path USING (id) LIMIT $1)
    RETURNING 1
)
SELECT count(*) FROM deleted;

-- name: ping
-- Whether the database answers.
SELECT 1;

-- name: commit_trials
-- A group's trial, history, verdict and current-trial writes in one statement (see migration 0003).
SELECT testfleet_commit_trials($1::jsonb);
