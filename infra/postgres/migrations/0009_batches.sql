-- The Files and Batch API of the gateway (producers/gateway/batches.py, batch_store.py).
--
-- batch_files: one row per file a tenant uploaded (purpose 'batch') or a batch wrote ('batch_output');
-- the bytes live under <home>/files/<tenant>/<id>.jsonl (gateways sharing batches share the home).
-- Every read names the tenant: another tenant's id is not found.
CREATE TABLE batch_files (
    id          text        PRIMARY KEY,
    tenant      text        NOT NULL,
    purpose     text        NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename    text        NOT NULL,
    bytes       bigint      NOT NULL CHECK (bytes >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batch_files_tenant ON batch_files (tenant, created_at DESC, id DESC);

-- batches: a batch's request, OpenAI status, progress (request counts, saved while it runs) and
-- results. Which gateway runs a batch is not stored: it holds the advisory lock of the batch's id
-- for as long as it runs it, so a gateway that dies lets another take it over.
CREATE TABLE batches (
    id                 text        PRIMARY KEY,
    tenant             text        NOT NULL,
    user_id            text        NOT NULL,
    endpoint           text        NOT NULL,
    input_file_id      text        NOT NULL,
    completion_window  text        NOT NULL,
    status             text        NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing',
                                       'completed', 'failed', 'expired', 'cancelling', 'cancelled')),
    metadata           jsonb,
    errors             jsonb,
    output_file_id     text,
    error_file_id      text,
    total              bigint      NOT NULL DEFAULT 0,
    completed          bigint      NOT NULL DEFAULT 0,
    failed             bigint      NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz NOT NULL,
    in_progress_at     timestamptz,
    finalizing_at      timestamptz,
    completed_at       timestamptz,
    failed_at          timestamptz,
    cancelling_at      timestamptz,
    cancelled_at       timestamptz
);
CREATE INDEX batches_tenant ON batches (tenant, created_at DESC, id DESC);
CREATE INDEX batches_unfinished ON batches (status)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- The gateway's role keeps both; `ragbus audit`'s read-only role may look.
GRANT SELECT, INSERT, UPDATE, DELETE ON batch_files TO ragbus_gateway;
GRANT SELECT, INSERT, UPDATE ON batches TO ragbus_gateway;
GRANT SELECT ON batch_files, batches TO ragbus_reader;
