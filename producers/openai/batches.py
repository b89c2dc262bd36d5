"""The subset of OpenAI's Files and Batch protocols that ragbus serves: the objects the gateway
answers with (shaped as the official clients parse them) and the body of `POST /v1/batches`,
validated here so a bad field is a 400 that names it."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas import limits

#: OpenAI's batch statuses.
BatchStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]
#: A batch in one of these is someone's to run (or to finish cancelling).
UNFINISHED: tuple[BatchStatus, ...] = ("validating", "in_progress", "finalizing", "cancelling")
FilePurpose = Literal["batch", "batch_output"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    #: Deprecated by OpenAI but still required by its clients' types.
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class CreateBatchRequest(BaseModel):
    """The body of `POST /v1/batches`. Unknown fields are refused (by name), never ignored."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=limits.EVENT_ID_MAX)
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > limits.BATCH_METADATA_KEYS_MAX:
            raise ValueError(f"at most {limits.BATCH_METADATA_KEYS_MAX} keys")
        for key, value in v.items():
            if len(key) > limits.BATCH_METADATA_KEY_MAX:
                raise ValueError(f"a key is longer than {limits.BATCH_METADATA_KEY_MAX} characters")
            if len(value) > limits.BATCH_METADATA_VALUE_MAX:
                raise ValueError(f"a value is longer than {limits.BATCH_METADATA_VALUE_MAX} characters")
        return v


PageT = TypeVar("PageT", FileList, BatchList)


def list_page(page_type: type[PageT], items: list[Any], limit: int) -> PageT:
    """One page of a list (FileList or BatchList): the first `limit` of `items`, fetched as
    limit + 1 so that `has_more` needs no second query."""
    page = items[:limit]
    return page_type(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(items) > limit,
    )
