"""Log lines that say which component spoke: `12:00:01.123 INFO  retrieval  message`."""

from __future__ import annotations

import logging
import sys

_NOISY = (
    "aiokafka",
    "kafka",
    "faust",
    "mode",
    "urllib3",
    "httpx",
    "pymilvus",
    "sentence_transformers",
    "asyncio",
)


def setup_logging(level: str = "INFO", *, component: str = "ragbus") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)-5s {component} %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
