-- PostgreSQL form of ../0004_api_tokens.sql.
-- API tokens of `castiron serve`: a name, a role and the SHA-256 of the secret (the secret
-- itself is shown once, when the token is created, and never stored).

CREATE TABLE api_tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'deployer', 'approver', 'admin')),
    hash       TEXT NOT NULL UNIQUE,
    created    TEXT NOT NULL,
    created_by TEXT NOT NULL,
    revoked    TEXT
);
