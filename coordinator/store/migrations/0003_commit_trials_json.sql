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
BEGIN
    IF jsonb_array_length(batch->0) > 0 THEN
        INSERT INTO trials (id, task_id, slave_id, created_at)
        SELECT (r->>0)::bigint, (r->>1)::bigint, (r->>2)::bigint, (r->>3)::timestamptz
        FROM jsonb_array_elements(batch->0) AS r
        ON CONFLICT (id) DO NOTHING;
    END IF;
    IF jsonb_array_length(batch->1) > 0 THEN
        UPDATE trials SET started_at = v.started_at
        FROM (SELECT (r->>0)::bigint AS id, (r->>1)::timestamptz AS started_at
              FROM jsonb_array_elements(batch->1) AS r) AS v
        WHERE trials.id = v.id AND trials.started_at IS NULL;
    END IF;
    IF jsonb_array_length(batch->2) > 0 THEN
        UPDATE trials SET status = v.status, stdout = v.stdout, stderr = v.stderr, passed = v.passed,
                          pending = v.pending, failed = v.failed, finished_at = v.finished_at
        FROM (SELECT (r->>0)::bigint AS id, r->>1 AS status, r->>2 AS stdout, r->>3 AS stderr,
                     (r->>4)::integer AS passed, (r->>5)::integer AS pending, (r->>6)::integer AS failed,
                     (r->>7)::timestamptz AS finished_at
              FROM jsonb_array_elements(batch->2) AS r) AS v
        WHERE trials.id = v.id;
    END IF;
    IF jsonb_array_length(batch->3) > 0 THEN
        INSERT INTO spec_samples (taskset_class, spec_sha1, spec_path, duration_ms)
        SELECT r->>0, r->>1, r->>2, (r->>3)::bigint FROM jsonb_array_elements(batch->3) AS r;
    END IF;
    IF jsonb_array_length(batch->4) > 0 THEN
        UPDATE tasks SET status = v.status
        FROM (SELECT (r->>0)::bigint AS id, r->>1 AS status FROM jsonb_array_elements(batch->4) AS r) AS v
        WHERE tasks.id = v.id;
    END IF;
    IF jsonb_array_length(batch->5) > 0 THEN
        UPDATE slaves SET current_trial_id = v.trial_id
        FROM (SELECT (r->>0)::bigint AS id, (r->>1)::bigint AS trial_id
              FROM jsonb_array_elements(batch->5) AS r) AS v
        WHERE slaves.id = v.id;
    END IF;
END
$$;
