-- PostgreSQL form of ../0003_approval_identity.sql.
-- Approvals carry an identity castiron can prove (kind + id: a signing key's id today; an
-- API token later), the OS user who recorded them and the signature, and are unique by
-- identity rather than by the CASTIRON_ACTOR label. Older approvals keep kind '' (none): they
-- were recorded under a label anyone could set, and no gate counts them.

ALTER TABLE approvals ADD COLUMN identity_kind TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN identity TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN os_user TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN signature TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals DROP CONSTRAINT approvals_pkey;
ALTER TABLE approvals ADD PRIMARY KEY (environment, release, identity_kind, identity, actor);
