-- Approvals carry an identity castiron can prove (kind + id: a signing key's id today; an
-- API token later), the OS user who recorded them and the signature, and are unique by
-- identity rather than by the CASTIRON_ACTOR label. Older approvals keep kind '' (none): they
-- were recorded under a label anyone could set, and no gate counts them.

CREATE TABLE approvals_v3 (
    environment   TEXT NOT NULL,
    release       TEXT NOT NULL,
    actor         TEXT NOT NULL,
    created       TEXT NOT NULL,
    comment       TEXT NOT NULL DEFAULT '',
    identity_kind TEXT NOT NULL DEFAULT '',
    identity      TEXT NOT NULL DEFAULT '',
    os_user       TEXT NOT NULL DEFAULT '',
    signature     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (environment, release, identity_kind, identity, actor)
) STRICT;

INSERT INTO approvals_v3 (environment, release, actor, created, comment)
    SELECT environment, release, actor, created, comment FROM approvals;
DROP TABLE approvals;
ALTER TABLE approvals_v3 RENAME TO approvals;
