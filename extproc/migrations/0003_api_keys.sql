-- API keys, stored as the SHA-256 of the secret (never the secret), mapped to a principal.
CREATE TABLE api_keys (
    key_hash     bytea       PRIMARY KEY CHECK (octet_length(key_hash) = 32),
    principal_id text        NOT NULL CHECK (principal_id <> ''),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE INDEX api_keys_principal_id_idx ON api_keys (principal_id);
