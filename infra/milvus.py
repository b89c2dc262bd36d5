"""Milvus clients: Milvus Lite (a local file, the embedded default) or any server by URI.

pymilvus's MilvusClient is synchronous; callers on an event loop run its calls in an executor.
Milvus Lite allows one process per data file, so with Lite every component that touches the
collection (ingestion and retrieval) runs inside one process.
"""

from __future__ import annotations

from pathlib import Path

from pymilvus import MilvusClient

from infra.settings import Settings


def make_milvus_client(settings: Settings, *, uri: str | None = None) -> MilvusClient:
    target = uri or settings.milvus_target
    if not target.startswith(("http://", "https://", "tcp://", "unix:")):
        Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)
        target = str(Path(target).expanduser())
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    return MilvusClient(uri=target, token=token)
