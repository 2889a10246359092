-- The slaves that never reached a final status, by taskset: after a restart the coordinator gives each of
-- them the grace period to re-bind, in finished tasksets too when such a slave still had a trial open (a
-- trial that would otherwise stay open for good). Few rows, and `status` changes once a slave, so the
-- hot path's updates of `current_trial_id` stay heap-only.
CREATE INDEX slaves_unfinished ON slaves (taskset_id) WHERE status IS NULL;
