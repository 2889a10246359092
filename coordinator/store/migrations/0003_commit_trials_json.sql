-- The group commit of 0002, taking its rows as one JSON document instead of 22 arrays: the coordinator
-- encodes a document for about a third of the CPU that 22 arrays of values cost it, which is what its
-- one core spends per commit; Postgres reads it back for about the same time as the arrays.
--
-- The document is an array of six arrays, one per write kind, in the order they are applied (so a trial
-- inserted by the group exists before the group starts or finishes it); each holds rows as arrays:
--   0 new trials      [id, task_id, slave_id, created_at]
--   1 starts          [trial_id, started_at]
--   2 results         [trial_id, status, stdout, stderr, passed, pending, failed, finished_at]
--   3 history samples [taskset_class, spec_sha1, spec_path, duration_ms]
--   4 task verdicts   [task_id, status]
--   5 current trials  [slave_id, trial_id or null]
-- Within a kind the store sends at most one row per id. Sequential scans stay ruled out (see 0002).

DROP FUNCTION testfleet_commit_trials(
    bigint[], bigint[], bigint[], timestamptz[], bigint[], timestamptz[], bigint[], text[], text[], text[],
    integer[], integer[], integer[], timestamptz[], text[], text[], text[], bigint[], bigint[], text[], bigint[],
    bigint[]
);

CREATE FUNCTION testfleet_commit_trials(batch jsonb) RETURNS void LANGUAGE plpgsql SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    ids bigint[];
    others bigint[];
    times timestamptz[];
    statuses text[];
    stdouts text[];
    stderrs text[];
    passed_counts integer[];
    pending_counts integer[];
    failed_counts integer[];
BEGIN
    -- The updates join arrays, as in 0002, not the document's rows: the plan a connection caches for a
    -- join with `jsonb_array_elements` (guessed at 100 rows) hashes the whole table once it has grown (at
    -- 40,000 trials, 18 ms to start 25 trials instead of 1), while a join with `unnest` looks each row up.
    IF jsonb_array_length(batch->0) > 0 THEN
        INSERT INTO trials (id, task_id, slave_id, created_at)
        SELECT (r->>0)::bigint, (r->>1)::bigint, (r->>2)::bigint, (r->>3)::timestamptz
        FROM jsonb_array_elements(batch->0) AS r
        ON CONFLICT (id) DO NOTHING;
    END IF;
    IF jsonb_array_length(batch->1) > 0 THEN
        SELECT array_agg((r->>0)::bigint), array_agg((r->>1)::timestamptz) INTO ids, times
        FROM jsonb_array_elements(batch->1) AS r;
        UPDATE trials SET started_at = v.started_at
        FROM unnest(ids, times) AS v(id, started_at)
        WHERE trials.id = v.id AND trials.started_at IS NULL;
    END IF;
    IF jsonb_array_length(batch->2) > 0 THEN
        SELECT array_agg((r->>0)::bigint), array_agg(r->>1), array_agg(r->>2), array_agg(r->>3),
               array_agg((r->>4)::integer), array_agg((r->>5)::integer), array_agg((r->>6)::integer),
               array_agg((r->>7)::timestamptz)
        INTO ids, statuses, stdouts, stderrs, passed_counts, pending_counts, failed_counts, times
        FROM jsonb_array_elements(batch->2) AS r;
        UPDATE trials SET status = v.status, stdout = v.stdout, stderr = v.stderr, passed = v.passed,
                          pending = v.pending, failed = v.failed, finished_at = v.finished_at
        FROM unnest(ids, statuses, stdouts, stderrs, passed_counts, pending_counts, failed_counts, times)
             AS v(id, status, stdout, stderr, passed, pending, failed, finished_at)
        WHERE trials.id = v.id;
    END IF;
    IF jsonb_array_length(batch->3) > 0 THEN
        INSERT INTO spec_samples (taskset_class, spec_sha1, spec_path, duration_ms)
        SELECT r->>0, r->>1, r->>2, (r->>3)::bigint FROM jsonb_array_elements(batch->3) AS r;
    END IF;
    IF jsonb_array_length(batch->4) > 0 THEN
        SELECT array_agg((r->>0)::bigint), array_agg(r->>1) INTO ids, statuses
        FROM jsonb_array_elements(batch->4) AS r;
        UPDATE tasks SET status = v.status
        FROM unnest(ids, statuses) AS v(id, status)
        WHERE tasks.id = v.id;
    END IF;
    IF jsonb_array_length(batch->5) > 0 THEN
        SELECT array_agg((r->>0)::bigint), array_agg((r->>1)::bigint) INTO ids, others
        FROM jsonb_array_elements(batch->5) AS r;
        UPDATE slaves SET current_trial_id = v.trial_id
        FROM unnest(ids, others) AS v(id, trial_id)
        WHERE slaves.id = v.id;
    END IF;
END
$$;
