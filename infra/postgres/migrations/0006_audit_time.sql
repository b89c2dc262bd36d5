-- created_at is no longer a time the producer chose.
--
-- Until now created_at was the Kafka record's timestamp, which on a CreateTime topic is whatever
-- the producer wrote: a record stamped 1970 or 2999 hid from `ragbus audit --since` and created
-- a monthly partition of its own. Now (sinks/audit/rows.py, choose_time) it is the broker's
-- LogAppendTime when the record carries one (ragbus topics are declared with
-- message.timestamp.type=LogAppendTime) within a year back and a day ahead of the sink's clock,
-- else the time the sink received the record. `time_source` says which; `producer_time` keeps the
-- producer's claim as data. Rows written before this migration have both NULL.

ALTER TABLE audit_log ADD COLUMN producer_time timestamptz;
ALTER TABLE audit_log ADD COLUMN time_source text
    CONSTRAINT audit_log_time_source_check CHECK (time_source IN ('broker', 'received'));

COMMENT ON COLUMN audit_log.created_at IS
    'Broker append time (time_source broker) or sink receive time (received); never the producer''s.';
COMMENT ON COLUMN audit_log.producer_time IS
    'The timestamp the producer put on the record (CreateTime), untrusted; NULL when the broker stamped it.';
COMMENT ON COLUMN audit_log.time_source IS
    'Where created_at came from: broker (LogAppendTime) or received (the sink''s clock); NULL before 0006.';

-- A broker time is the same on every read, so a replayed broker-timed record gets the key it had
-- and ON CONFLICT DO NOTHING drops it. A receive time is not: a replay of a receive-timed record
-- (a crash between the rows' commit and the offset commit, a fresh consumer group) would get a new
-- created_at and slip past the primary key. So before such a row goes in, its coordinates are
-- looked up across all partitions and a row already there wins. The advisory lock (one per Kafka
-- partition, held until commit) keeps two writers of the same record (a rebalance hand-over) from
-- both seeing nothing. Broker-timed rows skip the trigger entirely (its WHEN clause).
CREATE FUNCTION audit_log_skip_replayed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('audit_log/' || NEW.topic || '/' || NEW."partition", 0));
    IF EXISTS (
        SELECT 1 FROM audit_log
        WHERE topic = NEW.topic AND "partition" = NEW."partition" AND "offset" = NEW."offset"
    ) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_skip_replayed BEFORE INSERT ON audit_log
    FOR EACH ROW WHEN (NEW.time_source = 'received') EXECUTE FUNCTION audit_log_skip_replayed();

-- Months get their own partition only within the span created_at can now take (a year back, a
-- day ahead, plus the months the sink creates ahead); anything else goes to the default partition
-- instead of creating a partition for an absurd month.
CREATE OR REPLACE FUNCTION audit_log_ensure_partition(ts timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', ts, 'UTC');
    hi   timestamptz := date_trunc('month', ts, 'UTC') + interval '1 month';
    name text := 'audit_log_' || to_char(ts AT TIME ZONE 'UTC', '"y"YYYY"m"MM');
BEGIN
    IF ts < date_trunc('month', now() - interval '13 months', 'UTC')
       OR ts >= date_trunc('month', now(), 'UTC') + interval '3 months' THEN
        RETURN 'audit_log_default';
    END IF;
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
