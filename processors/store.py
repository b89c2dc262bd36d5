"""The chunk collection in Milvus: one row per chunk, every tenant in one collection.

Schema: `tenant_id` is the partition key (so a tenant's search touches only its partitions, and
the tenant filter is a plain scalar comparison, never a JSON path); `doc_id`, `version`,
`chunk_id`, `chunk_index`, `text`, `source`, `title`, `content_type` are scalar fields;
`metadata` (JSON) is returned, never filtered on; `dense` is the normalized embedding (HNSW,
inner product, M=32, efConstruction=100 where the server accepts HNSW); `sparse` is filled by
Milvus's BM25 function from `text`, for keyword and hybrid search.

A server without the BM25 function (Milvus before 2.5, e.g. the 2.3 standalone of
infra/milvus_server.py) gets a dense-only collection: no `sparse` field, no analyzer on `text`, no
inverted index on `doc_id` (2.4+). Hybrid requests are then answered by dense search, and the store
says so once, when it opens the collection. Milvus 2.3's upsert and delete also fall short (see
UPSERT_SINCE): there rows are deleted by key and inserted, and reads are Strong.

Re-ingesting a document writes its new chunks under a new `version` and then deletes every chunk
of that document with another version, so no stale chunk survives and the document is never
absent in between. The primary key is derived from (tenant, doc, version, index): replaying an
ingest writes the same rows again.

MilvusClient is synchronous: `call()` runs a method on the store's own worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker
from pymilvus.exceptions import MilvusException

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Scalar fields returned with every hit.
OUTPUT_FIELDS = ["tenant_id", "doc_id", "chunk_id", "chunk_index", "text", "source", "title", "metadata"]
TEXT_MAX_BYTES = 65_535
RRF_K = 60
#: The first Milvus release with the BM25 function (full-text search) and sparse vectors with it.
BM25_SINCE = (2, 5)
#: The first with INVERTED scalar indexes.
INVERTED_SINCE = (2, 4)
#: Milvus 2.3 upserts rows into a partition other than their partition key's (a count sees them, a
#: tenant's search does not), and its delete by filter returns no timestamp, so the client's
#: Session consistency does not cover deletes: there the store deletes the rows' keys and inserts
#: them instead of upserting, and reads with Strong consistency.
UPSERT_SINCE = (2, 4)


@dataclass(frozen=True)
class ChunkRow:
    """One chunk of a document, with its embedding, ready to be written."""

    index: int
    text: str
    vector: np.ndarray


@dataclass(frozen=True)
class DocumentMeta:
    tenant_id: str
    doc_id: str
    version: str
    source: str | None = None
    title: str | None = None
    content_type: str = "text/plain"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    tenant_id: str
    text: str
    score: float
    chunk_index: int = 0
    source: str | None = None
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class StoreError(RuntimeError):
    """Milvus refused or failed an operation."""


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def server_at_least(version: str, since: tuple[int, int]) -> bool:
    """Whether a server reporting `version` ("v2.3.5-lite", "v2.5.4") is Milvus `since` or newer.
    Milvus Lite ("milvus_lite-3.2.2", its own numbering; it has every feature the store uses) and a
    version that cannot be read count as new: the server then says itself what it refuses."""
    found = re.match(r"v?(\d+)\.(\d+)", version)
    if version.startswith("milvus_lite") or found is None:
        return True
    return (int(found.group(1)), int(found.group(2))) >= since


def chunk_pk(tenant_id: str, doc_id: str, version: str, index: int) -> str:
    return hashlib.sha1(f"{tenant_id}\x1f{doc_id}\x1f{version}\x1f{index}".encode()).hexdigest()


def chunk_id(doc_id: str, index: int) -> str:
    return f"{doc_id}#{index}"


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


class ChunkStore:
    def __init__(self, client: MilvusClient, collection: str, *, dimension: int, ef: int = 64) -> None:
        self.client = client
        self.collection = collection
        self.dimension = dimension
        self.ef = ef
        self.index_type = "HNSW"
        #: Whether the collection has the BM25 `sparse` field (hybrid search); set when opened.
        self.keyword_search = True
        #: Whether the server's upsert honours the partition key and its deletes are seen by this
        #: client's next read (Session consistency); set when opened.
        self.upserts = True
        #: Extra arguments of every read: Strong consistency where Session misses deletes.
        self._reads: dict[str, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus")

    # --- lifecycle ---------------------------------------------------------------------------
    def ensure_collection(self) -> None:
        """Create the collection when missing; check the dimension of an existing one; load it."""
        if self.client.has_collection(self.collection):
            self._check_existing()
        else:
            self._create()
        self.upserts = self._server_has(UPSERT_SINCE)
        self._reads = {} if self.upserts else {"consistency_level": "Strong"}
        if not self.keyword_search:
            log.warning(
                "Milvus at this URI (%s) has no BM25 function (Milvus %d.%d+): collection %s has no keyword "
                "index, and hybrid retrieval is answered by dense search only",
                self._server_version(),
                *BM25_SINCE,
                self.collection,
            )
        self.client.load_collection(self.collection)

    def _server_version(self) -> str:
        try:
            return str(self.client.get_server_version())
        except MilvusException:
            return "unknown version"

    def _server_has(self, since: tuple[int, int]) -> bool:
        return server_at_least(self._server_version(), since)

    def _check_existing(self) -> None:
        info = self.client.describe_collection(self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        dense = fields.get("dense")
        if dense is None or "tenant_id" not in fields:
            raise StoreError(
                f"collection {self.collection!r} exists but is not a ragbus chunk collection "
                f"(fields: {', '.join(fields)}); set RAGBUS_MILVUS_COLLECTION to another name"
            )
        dim = int((dense.get("params") or {}).get("dim", self.dimension))
        if dim != self.dimension:
            raise StoreError(
                f"collection {self.collection!r} holds {dim}-dimensional vectors, the embedding model "
                f"makes {self.dimension}: re-ingest into a new collection (RAGBUS_MILVUS_COLLECTION)"
            )
        self.keyword_search = "sparse" in fields

    def _create(self) -> None:
        self.keyword_search = self._server_has(BM25_SINCE)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("tenant_id", DataType.VARCHAR, max_length=128, is_partition_key=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
        schema.add_field("version", DataType.VARCHAR, max_length=64)
        schema.add_field("chunk_id", DataType.VARCHAR, max_length=300)
        schema.add_field("chunk_index", DataType.INT64)
        analyzed = {"enable_analyzer": True} if self.keyword_search else {}
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES, **analyzed)
        schema.add_field("source", DataType.VARCHAR, max_length=2048)
        schema.add_field("title", DataType.VARCHAR, max_length=1024)
        schema.add_field("content_type", DataType.VARCHAR, max_length=64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("ingested_at_ms", DataType.INT64)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=self.dimension)
        if self.keyword_search:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
        # pymilvus polls the index state with a call Milvus Lite does not implement; its gRPC
        # server logs each poll as an error although the collection is created fine.
        grpc_log = logging.getLogger("grpc._server")
        level = grpc_log.level
        grpc_log.setLevel(logging.CRITICAL)
        try:
            self._create_with(schema)
        finally:
            grpc_log.setLevel(level)
        log.info("created collection %s (%d dims, %s)", self.collection, self.dimension, self.index_type)

    def _create_with(self, schema: Any) -> None:
        try:
            self.client.create_collection(
                self.collection,
                schema=schema,
                index_params=self._index_params("HNSW"),
                consistency_level="Session",
            )
        except MilvusException as e:
            log.warning("Milvus refused an HNSW index (%s); using AUTOINDEX", e)
            self.index_type = "AUTOINDEX"
            self.client.create_collection(
                self.collection,
                schema=schema,
                index_params=self._index_params("AUTOINDEX"),
                consistency_level="Session",
            )

    def _index_params(self, dense_index: str) -> Any:
        params = self.client.prepare_index_params()
        if dense_index == "HNSW":
            params.add_index(
                "dense", index_type="HNSW", metric_type="IP", params={"M": 32, "efConstruction": 100}
            )
        else:
            params.add_index("dense", index_type="AUTOINDEX", metric_type="IP")
        if self.keyword_search:
            params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        if self._server_has(INVERTED_SINCE):
            params.add_index("doc_id", index_type="INVERTED")
        return params

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one of this store's methods on its worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.client.close()

    # --- writes ------------------------------------------------------------------------------
    def replace_document(self, doc: DocumentMeta, chunks: Sequence[ChunkRow]) -> int:
        """Write `chunks` as the document's only content; returns how many old chunks went away."""
        now_ms = int(time.time() * 1000)
        meta = json.loads(json.dumps(doc.metadata, default=str))
        rows = [
            {
                "pk": chunk_pk(doc.tenant_id, doc.doc_id, doc.version, c.index),
                "tenant_id": doc.tenant_id,
                "doc_id": doc.doc_id,
                "version": doc.version,
                "chunk_id": chunk_id(doc.doc_id, c.index),
                "chunk_index": c.index,
                "text": _truncate_utf8(c.text, TEXT_MAX_BYTES),
                "source": _truncate_utf8(doc.source or "", 2048),
                "title": _truncate_utf8(doc.title or "", 1024),
                "content_type": doc.content_type,
                "metadata": meta,
                "ingested_at_ms": now_ms,
                "dense": np.asarray(c.vector, dtype=np.float32).tolist(),
            }
            for c in chunks
        ]
        for start in range(0, len(rows), 512):
            batch = rows[start : start + 512]
            if self.upserts:
                self.client.upsert(self.collection, batch)
            else:
                # Not atomic: a replay of this version's rows is briefly absent; a new version's
                # rows have new keys, so nothing is deleted for them.
                self.client.delete(self.collection, ids=[r["pk"] for r in batch])
                self.client.insert(self.collection, batch)
        stale = (
            f"tenant_id == {quote(doc.tenant_id)} and doc_id == {quote(doc.doc_id)} "
            f"and version != {quote(doc.version)}"
        )
        return _deleted(self.client.delete(self.collection, filter=stale))

    def delete_document(self, tenant_id: str, doc_id: str) -> int:
        expr = f"tenant_id == {quote(tenant_id)} and doc_id == {quote(doc_id)}"
        return _deleted(self.client.delete(self.collection, filter=expr))

    # --- reads -------------------------------------------------------------------------------
    def search(
        self,
        tenant_id: str,
        vectors: np.ndarray,
        limit: int,
        *,
        texts: Sequence[str] | None = None,
        hybrid: bool = False,
    ) -> list[list[Hit]]:
        """Top-`limit` chunks of `tenant_id` for each query vector, in one Milvus call.

        With `hybrid`, each query's dense results and BM25 results for its text are fused with
        reciprocal rank fusion (RRF, k=60); on a collection without BM25 (`keyword_search` false,
        announced by `ensure_collection`) hybrid is dense search.
        """
        if len(vectors) == 0:
            return []
        tenant = f"tenant_id == {quote(tenant_id)}"
        data = np.asarray(vectors, dtype=np.float32).tolist()
        dense_params = {"metric_type": "IP", "params": {"ef": max(self.ef, limit)}}
        if hybrid and self.keyword_search:
            if texts is None or len(texts) != len(data):
                raise ValueError("hybrid search needs the query texts")
            candidates = max(limit * 3, 20)
            requests = [
                AnnSearchRequest(
                    data=data, anns_field="dense", param=dense_params, limit=candidates, expr=tenant
                ),
                AnnSearchRequest(
                    data=list(texts),
                    anns_field="sparse",
                    param={"metric_type": "BM25"},
                    limit=candidates,
                    expr=tenant,
                ),
            ]
            result = self.client.hybrid_search(
                self.collection,
                requests,
                ranker=RRFRanker(RRF_K),
                limit=limit,
                output_fields=OUTPUT_FIELDS,
                **self._reads,
            )
        else:
            result = self.client.search(
                self.collection,
                data=data,
                anns_field="dense",
                limit=limit,
                filter=tenant,
                output_fields=OUTPUT_FIELDS,
                search_params=dense_params,
                **self._reads,
            )
        return [[_hit(h) for h in hits] for hits in result]

    def count(self, tenant_id: str | None = None, doc_id: str | None = None) -> int:
        parts = []
        if tenant_id is not None:
            parts.append(f"tenant_id == {quote(tenant_id)}")
        if doc_id is not None:
            parts.append(f"doc_id == {quote(doc_id)}")
        rows = self.client.query(
            self.collection, filter=" and ".join(parts), output_fields=["count(*)"], **self._reads
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def chunks_of(self, tenant_id: str, doc_id: str) -> list[dict[str, Any]]:
        """Every stored chunk of one document (chunk_id, version, text), in chunk order."""
        rows = self.client.query(
            self.collection,
            filter=f"tenant_id == {quote(tenant_id)} and doc_id == {quote(doc_id)}",
            output_fields=["chunk_id", "chunk_index", "version", "text"],
            **self._reads,
        )
        return sorted((dict(r) for r in rows), key=lambda r: r["chunk_index"])


def release_lite(path: str) -> None:
    """Stop this process's Milvus Lite server for `path`, releasing the data file's lock (pymilvus
    keeps it until the process exits otherwise)."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(Path(path).expanduser()))


def _deleted(result: Any) -> int:
    if isinstance(result, dict):
        return int(result.get("delete_count", 0))
    try:
        return len(result)
    except TypeError:
        return 0


def _hit(raw: Any) -> Hit:
    entity = raw.get("entity") or {}
    return Hit(
        chunk_id=str(entity.get("chunk_id", "")),
        doc_id=str(entity.get("doc_id", "")),
        tenant_id=str(entity.get("tenant_id", "")),
        text=str(entity.get("text", "")),
        score=float(raw.get("distance", 0.0)),
        chunk_index=int(entity.get("chunk_index") or 0),
        source=entity.get("source") or None,
        title=entity.get("title") or None,
        metadata=dict(entity.get("metadata") or {}),
    )
