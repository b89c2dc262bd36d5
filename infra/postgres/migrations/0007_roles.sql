-- Least-privilege roles: components no longer act as the owner.
--
-- ragbus_sink (the audit sink) may only INSERT into audit_log; ragbus_reader (`ragbus audit`,
-- `ragbus usage`, `ragbus sink partitions`) may only SELECT. Neither may UPDATE, DELETE, TRUNCATE
-- or DROP: the audit trail is append-only for everyone but the owner, who runs the migrations
-- and retention (`ragbus sink prune`).
--
-- The roles are created here NOLOGIN; `ragbus up` gives them a login and a generated password
-- (infra/postgres/roles.py). Roles belong to the whole server: when this owner may not create
-- roles (an external server), an administrator creates them first.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['ragbus_sink', 'ragbus_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database's migration created it a moment ago
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % is missing and % may not create roles', r, current_user
                        USING HINT = 'as an administrator: CREATE ROLE ragbus_sink LOGIN PASSWORD ''...''; '
                                     'CREATE ROLE ragbus_reader LOGIN PASSWORD ''...''; then run ragbus up again';
            END;
        END IF;
    END LOOP;
END
$$;

-- The sink writes through the parent table (Postgres checks privileges on the table named in the
-- INSERT, not on the partition a row is routed to) and draws ids from the sequence. Its
-- `ON CONFLICT DO NOTHING` names no conflict target, so it needs no SELECT.
GRANT INSERT ON audit_log TO ragbus_sink;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO ragbus_sink;
-- Both may see which migrations are applied (the sink refuses to run on an older schema).
GRANT SELECT ON ragbus_migrations TO ragbus_sink, ragbus_reader;

-- What the sink's inserts need beyond INSERT runs as the owner, in two SECURITY DEFINER functions:
-- the replay check of receive-timed rows (a trigger that looks up existing rows: the sink itself
-- gets no SELECT) and the creation of monthly partitions. Their search_path is pinned to this
-- schema with pg_temp last, so a temporary table of the caller cannot stand in for audit_log.
DO $$
DECLARE
    s text := current_schema();
    part regclass;
BEGIN
    EXECUTE format('ALTER FUNCTION audit_log_skip_replayed() SECURITY DEFINER SET search_path = %I, pg_temp', s);
    EXECUTE format(
        'ALTER FUNCTION audit_log_ensure_partition(timestamptz) SECURITY DEFINER SET search_path = %I, pg_temp', s);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO ragbus_sink, ragbus_reader', s);
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO ragbus_sink', current_database());  -- its COPY staging table
    -- Readers: the table, every partition there is, and those the partition function creates later
    -- (it runs as the owner, whose default privileges apply).
    GRANT SELECT ON audit_log TO ragbus_reader;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'audit_log'::regclass LOOP
        EXECUTE format('GRANT SELECT ON %s TO ragbus_reader', part);
    END LOOP;
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO ragbus_reader', s);
END
$$;

REVOKE EXECUTE ON FUNCTION audit_log_ensure_partition(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_log_ensure_partition(timestamptz) TO ragbus_sink;
