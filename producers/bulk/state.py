"""A bulk job's durable state under `<home>/jobs/<tenant>/`: what it reads and writes, where its
answers start on the tenant's responses topic, which ids were sent, and whether it was cancelled.

Jobs are kept per tenant: the same `--job` under two tenants is two jobs, and one never resumes
(nor cancels, nor reads the sent ids of) the other's."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from schemas.topics import check_tenant

Status = Literal["running", "interrupted", "completed", "cancelled", "failed"]


@dataclass
class JobState:
    job_id: str
    input: str
    output: str
    input_format: str
    tenant_id: str
    user_id: str
    total: int = 0
    answered: int = 0
    errors: int = 0
    status: Status = "running"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: responses-topic partition → offset at the job's first start; answers are read from there.
    start_offsets: dict[str, int] = field(default_factory=dict)
    pid: int | None = None


class JobStore:
    """One tenant's jobs (raises ValueError for an invalid tenant name)."""

    def __init__(self, home: Path, tenant: str) -> None:
        self.tenant = check_tenant(tenant)
        self.dir = home / "jobs" / tenant
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, suffix: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"bad job id {job_id!r}")
        return self.dir / f"{job_id}{suffix}"

    def load(self, job_id: str) -> JobState | None:
        path = self._path(job_id, ".json")
        if not path.exists():
            return None
        return self._checked(JobState(**json.loads(path.read_text())))

    def _checked(self, state: JobState) -> JobState:
        if state.tenant_id != self.tenant:
            raise ValueError(f"job {state.job_id} in {self.dir} belongs to tenant {state.tenant_id!r}")
        return state

    def save(self, state: JobState) -> None:
        self._checked(state)
        state.updated_at = time.time()
        path = self._path(state.job_id, ".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        os.replace(tmp, path)

    def list(self) -> list[JobState]:
        return sorted(
            (self._checked(JobState(**json.loads(p.read_text()))) for p in self.dir.glob("*.json")),
            key=lambda s: s.created_at,
        )

    # --- which ids went out: appended after the broker acknowledged them ----------------------
    def sent_ids(self, job_id: str) -> set[str]:
        path = self._path(job_id, ".sent")
        if not path.exists():
            return set()
        return {line for line in path.read_text(encoding="utf-8").splitlines() if line}

    def sent_log(self, job_id: str):  # type: ignore[no-untyped-def]
        return self._path(job_id, ".sent").open("a", encoding="utf-8")

    # --- cancellation: a marker file the running job polls ----------------------------------
    def request_cancel(self, job_id: str) -> None:
        self._path(job_id, ".cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        return self._path(job_id, ".cancel").exists()

    def clear_cancel(self, job_id: str) -> None:
        self._path(job_id, ".cancel").unlink(missing_ok=True)
