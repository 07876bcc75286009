-- The first schema: images, tags, environments, releases, deployments and their journal,
-- instances, events, environment locks and the audit chain with its signed head.
-- Times are UTC ISO 8601 text ("2026-11-30T10:00:00.000000Z"); JSON columns hold canonical JSON.

CREATE TABLE images (
    digest  TEXT PRIMARY KEY,
    size    INTEGER NOT NULL,
    created TEXT NOT NULL,
    source  TEXT NOT NULL DEFAULT '',
    data    TEXT NOT NULL DEFAULT '{}'
) STRICT;

CREATE TABLE tags (
    tag     TEXT PRIMARY KEY,
    digest  TEXT NOT NULL REFERENCES images (digest),
    created TEXT NOT NULL
) STRICT;
CREATE INDEX tags_by_digest ON tags (digest);

CREATE TABLE releases (
    id          TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    digest      TEXT NOT NULL REFERENCES images (digest),
    config      TEXT NOT NULL,
    created     TEXT NOT NULL
) STRICT;
CREATE INDEX releases_by_environment ON releases (environment, created);

CREATE TABLE environments (
    name               TEXT PRIMARY KEY,
    runtime            TEXT NOT NULL,
    listen             TEXT NOT NULL,
    config             TEXT NOT NULL DEFAULT '{}',
    current_release    TEXT REFERENCES releases (id),
    known_good_release TEXT REFERENCES releases (id),
    updated            TEXT
) STRICT;

CREATE TABLE deployments (
    id           TEXT PRIMARY KEY,
    environment  TEXT NOT NULL,
    from_release TEXT REFERENCES releases (id),
    to_release   TEXT NOT NULL REFERENCES releases (id),
    strategy     TEXT NOT NULL,
    actor        TEXT NOT NULL,
    started      TEXT NOT NULL,
    finished     TEXT,
    outcome      TEXT NOT NULL,
    details      TEXT NOT NULL DEFAULT '{}',
    git_commit   TEXT
) STRICT;
CREATE INDEX deployments_by_environment ON deployments (environment, started);

CREATE TABLE deployment_steps (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    seq           INTEGER NOT NULL,
    step          TEXT NOT NULL,
    state         TEXT NOT NULL,
    data          TEXT NOT NULL DEFAULT '{}',
    at            TEXT NOT NULL,
    PRIMARY KEY (deployment_id, seq)
) STRICT;

CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    release     TEXT NOT NULL REFERENCES releases (id),
    address     TEXT NOT NULL,
    runtime     TEXT NOT NULL,
    status      TEXT NOT NULL,
    data        TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX instances_by_environment ON instances (environment);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT NOT NULL,
    environment TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX events_by_environment ON events (environment, time);

CREATE TABLE locks (
    environment TEXT PRIMARY KEY,
    token       TEXT NOT NULL,
    holder      TEXT NOT NULL,
    pid         INTEGER,
    host        TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('lease', 'manual')),
    acquired    TEXT NOT NULL,
    expires     TEXT NOT NULL
) STRICT;

CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    time        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    environment TEXT,
    subject     TEXT,
    from_value  TEXT,
    to_value    TEXT,
    result      TEXT NOT NULL,
    details     TEXT NOT NULL,
    prev        TEXT NOT NULL,
    hash        TEXT NOT NULL
) STRICT;
CREATE INDEX audit_by_environment ON audit (environment, seq);
CREATE INDEX audit_by_time ON audit (time);

CREATE TABLE audit_head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL,
    hash       TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature  TEXT NOT NULL
) STRICT;
