"""The audit sink: every record of every `<prefix>.*` topic, DLQs included, becomes one row of
`audit_log` in Postgres, exactly once (record coordinates are the key; replays are no-ops)."""
