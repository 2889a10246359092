-- The hot path's writes in one statement: a group commit of trial lifecycles becomes a single round trip.
-- Each argument group is one write kind as column arrays (empty when the group has none), applied in
-- this order, so a trial inserted by the group exists before the group starts or finishes it. Within a
-- kind the store sends at most one row per id.
--
-- Every statement here touches a few rows by primary key. Sequential scans are ruled out because a plan
-- cached while a table was small would otherwise go on scanning it whole as it grows: at 40,000 trials
-- a group commit took ten times as long.
CREATE FUNCTION testfleet_commit_trials(
    new_trial_ids      bigint[],
    new_trial_tasks    bigint[],
    new_trial_slaves   bigint[],
    new_trial_created  timestamptz[],
    started_ids        bigint[],
    started_ats        timestamptz[],
    finished_ids       bigint[],
    finished_statuses  text[],
    finished_stdouts   text[],
    finished_stderrs   text[],
    finished_passed    integer[],
    finished_pending   integer[],
    finished_failed    integer[],
    finished_ats       timestamptz[],
    sample_classes     text[],
    sample_sha1s       text[],
    sample_paths       text[],
    sample_ms          bigint[],
    decided_task_ids   bigint[],
    decided_statuses   text[],
    bound_slave_ids    bigint[],
    bound_trial_ids    bigint[]
) RETURNS void LANGUAGE plpgsql SET enable_seqscan = off AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(new_trial_ids) > 0 THEN
        INSERT INTO trials (id, task_id, slave_id, created_at)
        SELECT * FROM unnest(new_trial_ids, new_trial_tasks, new_trial_slaves, new_trial_created)
        ON CONFLICT (id) DO NOTHING;
    END IF;
    IF cardinality(started_ids) > 0 THEN
        UPDATE trials SET started_at = v.started_at
        FROM unnest(started_ids, started_ats) AS v(id, started_at)
        WHERE trials.id = v.id AND trials.started_at IS NULL;
    END IF;
    IF cardinality(finished_ids) > 0 THEN
        UPDATE trials SET status = v.status, stdout = v.stdout, stderr = v.stderr, passed = v.passed,
                          pending = v.pending, failed = v.failed, finished_at = v.finished_at
        FROM unnest(finished_ids, finished_statuses, finished_stdouts, finished_stderrs, finished_passed,
                    finished_pending, finished_failed, finished_ats)
             AS v(id, status, stdout, stderr, passed, pending, failed, finished_at)
        WHERE trials.id = v.id;
    END IF;
    IF cardinality(sample_classes) > 0 THEN
        INSERT INTO spec_samples (taskset_class, spec_sha1, spec_path, duration_ms)
        SELECT * FROM unnest(sample_classes, sample_sha1s, sample_paths, sample_ms);
    END IF;
    IF cardinality(decided_task_ids) > 0 THEN
        UPDATE tasks SET status = v.status
        FROM unnest(decided_task_ids, decided_statuses) AS v(id, status)
        WHERE tasks.id = v.id;
    END IF;
    IF cardinality(bound_slave_ids) > 0 THEN
        UPDATE slaves SET current_trial_id = v.trial_id
        FROM unnest(bound_slave_ids, bound_trial_ids) AS v(id, trial_id)
        WHERE slaves.id = v.id;
    END IF;
END
$$;
