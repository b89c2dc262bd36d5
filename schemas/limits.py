"""Every per-field limit of the contract, defined once.

The event models (`schemas.base`, `schemas.events`) take their `max_length`s from here, so the
JSON Schema files in `schemas/json/` carry the same numbers; decoding salvages an envelope from
bad bytes only within these limits; and a dead letter cuts whatever it echoes to them (saying
so), so building a dead letter can never fail validation. Byte limits per topic live beside the
topics in `schemas.topics`.

Why limits at all: every record on the bus may come from a system ragbus does not control, and an
unbounded string is memory, log volume and prompt tokens that another tenant pays for.
"""

from __future__ import annotations

#: Identifiers (characters).
EVENT_ID_MAX = 64
REQUEST_ID_MAX = 128
#: A tenant id is part of topic and principal names (`ragbus.t.<tenant>.chat.requests`).
TENANT_ID_MAX = 64
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
USER_ID_MAX = 256
CONVERSATION_ID_MAX = 128
JOB_ID_MAX = 128
CUSTOM_ID_MAX = 256
DOC_ID_MAX = 256
MODEL_NAME_MAX = 256

#: Chat text (characters).
QUESTION_MAX = 32_000
MESSAGE_CONTENT_MAX = 100_000
HISTORY_MAX = 200
SYSTEM_PROMPT_MAX = 16_000
STOP_SEQUENCES_MAX = 8
STOP_SEQUENCE_MAX = 256

#: Sampling: answers per request (OpenAI's `n`), alternatives per token (`top_logprobs`, OpenAI's
#: own bound), and the logprob entries one response may carry, n * max_tokens * (top_logprobs + 1),
#: so that a response with logprobs (each entry some 60 bytes of JSON) stays far below the
#: responses topic's 8 MiB.
CHOICES_MAX = 8
TOP_LOGPROBS_MAX = 20
LOGPROB_ENTRIES_MAX = 65_536
#: The text of one token as a logprob entry carries it (characters; tokens are a few bytes).
TOKEN_TEXT_MAX = 256

#: Structured output: a JSON Schema (`response_format`) as compact JSON (characters), how deeply it
#: may nest (the grammar compiler recurses on it), and its name (OpenAI's pattern and length).
JSON_SCHEMA_MAX = 16_384
JSON_SCHEMA_DEPTH_MAX = 32
JSON_SCHEMA_NAME_MAX = 64
JSON_SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"

#: Cancellation: why a request was cancelled (characters), the cancels one worker holds while it
#: waits for their requests (beyond this the oldest are forgotten, so a flood of cancels costs
#: bounded memory), and how long a cancel is held (seconds): the cancel topics keep records as long,
#: and a starting worker reads back this far, so a restart forgets no cancel still owed.
CANCEL_REASON_MAX = 256
CANCELS_PENDING_MAX = 100_000
CANCEL_TTL_S = 24 * 3600
#: The largest cancel event a worker decodes (bytes; a valid one is a few hundred).
CANCEL_EVENT_BYTES_MAX = 16 * 1024

#: Documents (characters).
SOURCE_MAX = 2048
TITLE_MAX = 1024

#: Free-form metadata attached to requests and documents.
METADATA_KEYS_MAX = 64
METADATA_KEY_MAX = 128
METADATA_VALUE_MAX = 4096

#: Error text carried in responses and dead letters (characters), and a dead letter's error class.
ERROR_MESSAGE_MAX = 4000
ERROR_CLASS_MAX = 64

#: What a dead letter echoes of the record it gives up on: the original value up to the source
#: topic's `max.message.bytes` (its DLQ is sized for that, base64 included), at most this many
#: headers of at most this many bytes each, and a key of at most this many bytes.
DEAD_LETTER_HEADERS_MAX = 64
DEAD_LETTER_HEADER_VALUE_MAX = 8192
DEAD_LETTER_KEY_MAX = 4096

#: The Files and Batch API (OpenAI's own bounds): the largest file a tenant may upload (bytes; the
#: gateway's setting may lower it), the requests one batch may hold, a file's name (characters), and
#: a batch's metadata (keys, key and value characters).
BATCH_FILE_BYTES_MAX = 200 * 1024 * 1024
BATCH_REQUESTS_MAX = 50_000
FILENAME_MAX = 256
BATCH_METADATA_KEYS_MAX = 16
BATCH_METADATA_KEY_MAX = 64
BATCH_METADATA_VALUE_MAX = 512

#: Appended to anything cut to a limit, so a reader knows it is not the whole value.
CUT_MARK = "…[cut]"


def cut(text: str, limit: int) -> str:
    """`text` if it fits `limit` characters, else its head plus CUT_MARK, `limit` long in all."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(CUT_MARK))] + CUT_MARK


#: Texts per /v1/embeddings request (OpenAI takes 2048; ragbus encodes on a CPU, and one request
#: should not hold the model for minutes). Each text is at most QUESTION_MAX characters.
EMBEDDING_INPUTS_MAX = 256
