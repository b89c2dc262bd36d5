-- Quotas of the gateway (producers/gateway/quotas.py): limits per tenant, and the counters every
-- gateway process shares, so a limit holds across any number of them.
--
-- quota_limits: a tenant's limits (`ragbus tenants limits`); NULL: the gateway's default setting,
-- 0: unlimited. Per-key limits live beside the key in the gateway's keys file.
CREATE TABLE quota_limits (
    tenant          text        PRIMARY KEY,
    rpm             bigint      CHECK (rpm >= 0),
    tpm             bigint      CHECK (tpm >= 0),
    monthly_tokens  bigint      CHECK (monthly_tokens >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- quota_counters: one row per (tenant, key scope, period) holding the CURRENT fixed window of that
-- period ('minute' or 'month'); a request in a later window restarts the row's counts in place, so
-- the table never grows with time and the gateway needs no DELETE. key_id '' is the whole tenant,
-- otherwise a key's fingerprint (never the key). `tokens` is what the window's limit is checked
-- against: reservations (estimate) settled to real usage. The month row also keeps the outcome
-- counts `ragbus usage` shows: successful generations and their tokens, errors, cache hits.
-- cap_* are the limits in force at the row's last request (what `ragbus usage` compares against).
CREATE TABLE quota_counters (
    tenant             text        NOT NULL,
    key_id             text        NOT NULL DEFAULT '',
    period             text        NOT NULL CONSTRAINT quota_counters_period_check CHECK (period IN ('minute', 'month')),
    window_start       timestamptz NOT NULL,
    requests           bigint      NOT NULL DEFAULT 0,
    tokens             bigint      NOT NULL DEFAULT 0,
    cap_requests       bigint      NOT NULL DEFAULT 0,
    cap_tokens         bigint      NOT NULL DEFAULT 0,
    ok_requests        bigint      NOT NULL DEFAULT 0,
    prompt_tokens      bigint      NOT NULL DEFAULT 0,
    completion_tokens  bigint      NOT NULL DEFAULT 0,
    error_requests     bigint      NOT NULL DEFAULT 0,
    cache_hits         bigint      NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key_id, period)
);

-- The gateway's own role: it reads the limits and the schema version, and adds to the counters.
-- It may not change limits, delete counters, or touch the audit trail.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ragbus_gateway') THEN
        BEGIN
            CREATE ROLE ragbus_gateway NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it a moment ago
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role ragbus_gateway is missing and % may not create roles', current_user
                    USING HINT = 'as an administrator: CREATE ROLE ragbus_gateway LOGIN PASSWORD ''...''; '
                                 'then run ragbus up again';
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO ragbus_gateway', current_schema());
END
$$;

GRANT SELECT ON quota_limits TO ragbus_gateway;
GRANT SELECT, INSERT, UPDATE ON quota_counters TO ragbus_gateway;
GRANT SELECT ON ragbus_migrations TO ragbus_gateway;
-- `ragbus usage` reads both as the read-only role.
GRANT SELECT ON quota_limits, quota_counters TO ragbus_reader;
