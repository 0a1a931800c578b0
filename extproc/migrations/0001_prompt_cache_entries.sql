-- The prefix index: one row per cached prefix of one scope (principal, model, tokenizer version).
CREATE TABLE prompt_cache_entries (
    principal_id           text        NOT NULL,
    virtual_model          text        NOT NULL,
    tokenizer_version      text        NOT NULL,
    prefix_hash            bytea       NOT NULL CHECK (octet_length(prefix_hash) = 32),
    cumulative_token_count integer     NOT NULL CHECK (cumulative_token_count >= 0),
    ttl_tier               text        NOT NULL CHECK (ttl_tier IN ('5m', '1h', '24h')),
    created_at             timestamptz NOT NULL DEFAULT now(),
    expires_at             timestamptz NOT NULL,
    CONSTRAINT prompt_cache_entries_pkey
        PRIMARY KEY (principal_id, virtual_model, tokenizer_version, prefix_hash)
);

-- The expiry sweeper deletes in expires_at order.
CREATE INDEX prompt_cache_entries_expires_at_idx ON prompt_cache_entries (expires_at);
