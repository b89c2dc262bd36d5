"""How ragbus reaches and starts Kafka, Postgres and Milvus; settings, telemetry and the CLI."""
