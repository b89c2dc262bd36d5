"""Milvus Lite, the embedded default, works as a real vector store from a local file."""

from __future__ import annotations

import numpy as np
from pymilvus import DataType

from infra.milvus import make_milvus_client
from infra.settings import Settings


def test_lite_file_stores_and_searches(base_settings: Settings) -> None:
    assert base_settings.uses_milvus_lite
    client = make_milvus_client(base_settings)
    name = base_settings.milvus_collection
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index("vec", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=index)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    client.insert(name, [{"id": f"v{i}", "vec": v.tolist()} for i, v in enumerate(vectors)])
    hits = client.search(name, data=[vectors[7].tolist()], limit=3, output_fields=["id"])
    assert hits[0][0]["id"] == "v7"
    client.close()

    reopened = make_milvus_client(base_settings)
    assert name in reopened.list_collections()
    reopened.load_collection(name)
    assert reopened.get(name, ids=["v3"])[0]["id"] == "v3"
    reopened.close()
