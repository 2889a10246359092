-- The whole record of tasksets, tasks, trials, worker logs, slaves and run-time history.

-- Ids of tasks, trials, slaves and worker logs are handed out in blocks (a sequence's
-- increment is its block size) so the coordinator can name new rows before it commits them.

CREATE TABLE tasksets (
    id             bigint PRIMARY KEY,
    rsync_name     text        NOT NULL,
    setup_command  text        NOT NULL,
    slave_command  text        NOT NULL,
    worker_type    text        NOT NULL,
    taskset_class  text        NOT NULL,
    max_workers    integer     NOT NULL,
    max_trials     integer     NOT NULL,
    status         text        NOT NULL,
    created_at     timestamptz NOT NULL,
    finished_at    timestamptz
);
CREATE SEQUENCE tasksets_id_seq OWNED BY tasksets.id;
-- At most one active taskset per rsync_name: the database enforces what create_taskset promises.
CREATE UNIQUE INDEX tasksets_active_rsync_name ON tasksets (rsync_name)
    WHERE status IN ('rsync_waiting', 'waiting', 'running');
CREATE INDEX tasksets_active ON tasksets (id) WHERE status IN ('rsync_waiting', 'waiting', 'running');

CREATE TABLE tasks (
    id                bigint PRIMARY KEY,
    taskset_id        bigint  NOT NULL REFERENCES tasksets (id),
    position          integer NOT NULL,
    spec_path         text    NOT NULL,
    spec_sha1         text    NOT NULL,
    hard_timeout_sec  integer NOT NULL,
    soft_timeout_sec  integer NOT NULL,
    status            text,
    UNIQUE (taskset_id, spec_path)
);
CREATE SEQUENCE tasks_id_seq INCREMENT BY 1000 OWNED BY tasks.id;

CREATE TABLE slaves (
    id          bigint PRIMARY KEY,
    taskset_id  bigint      NOT NULL REFERENCES tasksets (id),
    name        text        NOT NULL,
    status      text,
    current_trial_id bigint,
    created_at  timestamptz NOT NULL,
    UNIQUE (name, taskset_id)
);
CREATE SEQUENCE slaves_id_seq INCREMENT BY 1000 OWNED BY slaves.id;

CREATE TABLE trials (
    id           bigint PRIMARY KEY,
    task_id      bigint      NOT NULL REFERENCES tasks (id),
    slave_id     bigint      NOT NULL REFERENCES slaves (id),
    status       text,
    stdout       text,
    stderr       text,
    passed       integer,
    pending      integer,
    failed       integer,
    created_at   timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz
);
CREATE SEQUENCE trials_id_seq INCREMENT BY 1000 OWNED BY trials.id;
CREATE INDEX trials_task ON trials (task_id);

CREATE TABLE worker_logs (
    id                 bigint PRIMARY KEY,
    taskset_id         bigint      NOT NULL REFERENCES tasksets (id),
    worker_name        text        NOT NULL,
    log                text        NOT NULL DEFAULT '',
    started_at         timestamptz NOT NULL,
    rsync_finished_at  timestamptz,
    setup_finished_at  timestamptz,
    rspec_finished_at  timestamptz,
    finished_at        timestamptz,
    UNIQUE (taskset_id, worker_name)
);
CREATE SEQUENCE worker_logs_id_seq INCREMENT BY 1000 OWNED BY worker_logs.id;

-- History for scheduling: one row per passed or pending trial, read newest first through
-- the indexes, so an average never scans more than its 100 latest samples.
CREATE TABLE spec_samples (
    id             bigserial PRIMARY KEY,
    taskset_class  text   NOT NULL,
    spec_sha1      text   NOT NULL,
    spec_path      text   NOT NULL,
    duration_ms    bigint NOT NULL
);
CREATE INDEX spec_samples_by_sha1 ON spec_samples (taskset_class, spec_sha1, id DESC);
CREATE INDEX spec_samples_by_path ON spec_samples (taskset_class, spec_path, id DESC);
