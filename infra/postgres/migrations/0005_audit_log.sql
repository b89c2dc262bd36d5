-- The audit trail: one row per Kafka record on any ragbus topic (written by sinks/audit).
--
-- Follows the audit_log design (id, user_id, action_type, request_payload JSONB, ip_address,
-- created_at, indexes on user_id and created_at), extended with what a streaming sink needs.
--
-- created_at is the Kafka record's timestamp, so it is a pure function of the record: a replayed
-- record lands in the same monthly partition with the same key and `ON CONFLICT DO NOTHING`
-- drops it. Postgres wants the partition key inside every unique constraint; the record's
-- coordinates plus created_at are that key. Retention is `DROP TABLE audit_log_yYYYYmMM`.

CREATE SEQUENCE audit_log_id_seq AS bigint;

CREATE TABLE audit_log (
    id                bigint      NOT NULL DEFAULT nextval('audit_log_id_seq'),
    user_id           text,
    action_type       text        NOT NULL,
    request_payload   jsonb       NOT NULL,
    ip_address        inet,
    created_at        timestamptz NOT NULL,
    topic             text        NOT NULL,
    "partition"       integer     NOT NULL,
    "offset"          bigint      NOT NULL,
    event_type        text,
    event_id          text,
    request_id        text,
    tenant_id         text,
    trace_id          text,
    lane              text,
    model             text,
    prompt_tokens     integer,
    completion_tokens integer,
    key_id            text,
    error             text,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_log_action_type_check CHECK (action_type IN (
        'QUERY', 'RETRIEVAL', 'RESPONSE', 'TOKEN', 'INGEST',
        'MODEL_UPDATE', 'CONFIG_CHANGE', 'ERROR', 'OTHER')),
    CONSTRAINT audit_log_pkey PRIMARY KEY (topic, "partition", "offset", created_at)
) PARTITION BY RANGE (created_at);

ALTER SEQUENCE audit_log_id_seq OWNED BY audit_log.id;

COMMENT ON COLUMN audit_log.created_at IS 'Kafka record timestamp (deterministic per record).';
COMMENT ON COLUMN audit_log.recorded_at IS 'When the sink wrote the row.';
COMMENT ON COLUMN audit_log.key_id IS 'Key that encrypted the payload''s sensitive fields; NULL: plaintext.';
COMMENT ON COLUMN audit_log.error IS 'Why the record is not a decodable event (its bytes are in the payload).';

CREATE INDEX audit_log_user_id_idx ON audit_log (user_id, created_at);
CREATE INDEX audit_log_created_at_idx ON audit_log (created_at);
CREATE INDEX audit_log_tenant_id_idx ON audit_log (tenant_id, created_at);
CREATE INDEX audit_log_request_id_idx ON audit_log (request_id);

-- Catches rows of months without a partition, so an insert never fails on a new month.
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;

-- The partition for the month of `ts` (UTC), created when missing. Rows of that month that
-- already sit in the default partition move into it, so creating a month late is safe too.
CREATE FUNCTION audit_log_ensure_partition(ts timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', ts, 'UTC');
    hi   timestamptz := date_trunc('month', ts, 'UTC') + interval '1 month';
    name text := 'audit_log_' || to_char(ts AT TIME ZONE 'UTC', '"y"YYYY"m"MM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('audit_log_ensure_partition'));
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_log_default WHERE created_at >= lo AND created_at < hi) THEN
        EXECUTE format('CREATE TABLE %I (LIKE audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
        EXECUTE format(
            'WITH moved AS (DELETE FROM audit_log_default WHERE created_at >= %L AND created_at < %L '
            'RETURNING *) INSERT INTO %I SELECT * FROM moved', lo, hi, name);
        EXECUTE format('ALTER TABLE audit_log ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    ELSE
        EXECUTE format('CREATE TABLE %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    END IF;
    RETURN name;
END
$$;

-- Last month, this month and the next two exist from the start; the sink adds the rest ahead.
SELECT audit_log_ensure_partition(now() + make_interval(months => m)) FROM generate_series(-1, 2) AS m;
