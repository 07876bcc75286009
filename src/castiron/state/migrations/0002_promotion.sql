-- Promotion: approvals of a release for an environment, and the gate results of every
-- policy evaluation (passed or refused), kept beside the deployment they allowed.

CREATE TABLE approvals (
    environment TEXT NOT NULL,
    release     TEXT NOT NULL,
    actor       TEXT NOT NULL,
    created     TEXT NOT NULL,
    comment     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (environment, release, actor)
) STRICT;

CREATE TABLE gate_results (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    evaluation  TEXT NOT NULL,
    environment TEXT NOT NULL,
    release     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    gate        TEXT NOT NULL,
    passed      INTEGER NOT NULL CHECK (passed IN (0, 1)),
    reason      TEXT NOT NULL,
    data        TEXT NOT NULL DEFAULT '{}',
    checked     TEXT NOT NULL
) STRICT;
CREATE INDEX gate_results_by_environment ON gate_results (environment, release, checked);
CREATE INDEX gate_results_by_evaluation ON gate_results (evaluation);
