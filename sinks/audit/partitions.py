"""The monthly partitions of `audit_log`: list them, and retention as a DROP of whole months."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

_BOUNDS = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


@dataclass
class Partition:
    name: str
    #: None for the default partition (rows of months without their own partition).
    start: datetime | None
    end: datetime | None
    rows: int
    bytes: int


async def list_partitions(conn: asyncpg.Connection, *, exact: bool = False) -> list[Partition]:
    """Partitions in time order (default last). Row counts are estimates unless `exact`."""
    records = await conn.fetch(
        """SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
                  greatest(c.reltuples, 0)::bigint AS estimate, pg_total_relation_size(c.oid) AS bytes
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'audit_log'::regclass"""
    )
    out = []
    for r in records:
        m = _BOUNDS.search(r["bound"])
        start = end = None
        if m:
            start, end = (datetime.fromisoformat(v) for v in m.groups())
        rows = r["estimate"]
        if exact:
            rows = await conn.fetchval(f'SELECT count(*) FROM "{r["name"]}"')
        out.append(Partition(r["name"], start, end, rows, r["bytes"]))
    return sorted(out, key=lambda p: (p.start is None, p.start or datetime.min))


async def drop_before(
    conn: asyncpg.Connection, cutoff: datetime, *, dry_run: bool = False
) -> list[Partition]:
    """Drop every monthly partition that ends at or before `cutoff` (whole months only; the
    default partition is never dropped). Returns the partitions dropped (or that would be)."""
    doomed = [p for p in await list_partitions(conn) if p.end is not None and p.end <= cutoff]
    if not dry_run:
        async with conn.transaction():
            for p in doomed:
                await conn.execute(f'ALTER TABLE audit_log DETACH PARTITION "{p.name}"')
                await conn.execute(f'DROP TABLE "{p.name}"')
    return doomed
