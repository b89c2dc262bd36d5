"""JSON Schema export of every event, for producers and consumers outside Python."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.headers import EVENT_MODELS
from schemas.topics import TOPICS

JSON_DIR = Path(__file__).parent / "json"


def schema_documents() -> dict[str, str]:
    """File name → JSON text, one file per event type plus an index of topics."""
    docs: dict[str, str] = {}
    for event_type, model in sorted(EVENT_MODELS.items()):
        schema = model.model_json_schema(mode="validation")
        schema["$id"] = f"https://ragbus.dev/schemas/{event_type}.json"
        schema["x-ragbus-event-type"] = event_type
        docs[f"{event_type}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    index = {
        "topics": [
            {
                # per-tenant topics are named with a placeholder: ragbus.t.{tenant}.chat.requests
                "topic": t.name()
                if not t.per_tenant
                else t.name(tenant="TENANT").replace("TENANT", "{tenant}"),
                "per_tenant": t.per_tenant,
                "event_type": t.event.event_type,
                "schema": f"{t.event.event_type}.json",
                "key": "doc_id"
                if t.suffix.startswith("docs.")
                else ("source key" if t.suffix.endswith(".dlq") else "request_id"),
                "partitions": t.partitions,
                "max_event_bytes": t.max_event_bytes,
            }
            for t in TOPICS
        ]
    }
    docs["topics.json"] = json.dumps(index, indent=2) + "\n"
    return docs


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_documents().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
