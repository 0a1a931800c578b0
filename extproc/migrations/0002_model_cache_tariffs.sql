-- Append-only ledger of cache tariffs: a model is cache-enabled while it has a row valid now.
CREATE TABLE model_cache_tariffs (
    id                   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_alias          text        NOT NULL CHECK (model_alias <> ''),
    write_multiplier_5m  numeric     NOT NULL CHECK (write_multiplier_5m >= 0),
    write_multiplier_1h  numeric     NOT NULL CHECK (write_multiplier_1h >= 0),
    write_multiplier_24h numeric     NOT NULL CHECK (write_multiplier_24h >= 0),
    read_multiplier      numeric     NOT NULL CHECK (read_multiplier >= 0),
    min_prefix_tokens    integer     NOT NULL CHECK (min_prefix_tokens >= 0),
    valid_from           timestamptz NOT NULL DEFAULT now(),
    valid_until          timestamptz,
    CONSTRAINT model_cache_tariffs_validity CHECK (valid_until IS NULL OR valid_until >= valid_from)
);

-- At most one open-ended (active) row per model.
CREATE UNIQUE INDEX model_cache_tariffs_one_active_idx
    ON model_cache_tariffs (model_alias) WHERE valid_until IS NULL;

CREATE INDEX model_cache_tariffs_alias_idx ON model_cache_tariffs (model_alias, valid_from);

-- The ledger is append-only: a row may only be closed (valid_until set once), never edited
-- or deleted, so past tariffs stay available to billing.
CREATE FUNCTION model_cache_tariffs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'model_cache_tariffs is append-only: rows cannot be deleted';
    END IF;
    IF OLD.valid_until IS NOT NULL
       OR (to_jsonb(NEW) - 'valid_until') IS DISTINCT FROM (to_jsonb(OLD) - 'valid_until') THEN
        RAISE EXCEPTION 'model_cache_tariffs is append-only: only closing an open row is allowed';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER model_cache_tariffs_append_only
    BEFORE UPDATE OR DELETE ON model_cache_tariffs
    FOR EACH ROW EXECUTE FUNCTION model_cache_tariffs_append_only();
