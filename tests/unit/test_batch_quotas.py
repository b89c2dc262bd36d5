"""How a batch line waits for, or is refused by, its tenant's quota (producers/gateway/batch_quotas.py):
the decisions over what the counters answer, with the counters' answers given in order."""

from __future__ import annotations

import time
from typing import Any

import pytest

from producers.bulk.admission import LineRefused
from producers.gateway.batch_quotas import QUOTA_EXCEEDED, QuotaAdmission
from producers.gateway.quota_windows import Exceeded
from producers.gateway.quotas import QuotaUnavailable, Reservation
from schemas import ChatRequest

REQUEST = ChatRequest(question="What is 2 plus 2?", tenant_id="acme")


class Answers:
    """The counters' answers to successive reservations (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def reserve(self, who: Any, request: ChatRequest) -> Any:
        assert who.tenant_id == "acme" and who.limits is None  # the tenant's limits only
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _admission(answers: Answers) -> QuotaAdmission:
    return QuotaAdmission(answers, "acme", "alice", retry_s=0.1)  # type: ignore[arg-type]


HELD = Reservation("acme", 9, [])


async def test_a_line_within_the_quota_goes_at_once() -> None:
    answers = Answers(HELD)
    assert await _admission(answers).admit(REQUEST, lambda: False) is HELD


async def test_over_a_per_minute_limit_the_line_waits_for_the_window() -> None:
    answers = Answers(Exceeded("tokens", 100, 95, 9, 1, "tenant acme"), HELD)
    started = time.monotonic()
    assert await _admission(answers).admit(REQUEST, lambda: False) is HELD
    assert time.monotonic() - started >= 0.9 and answers.asked == 2


async def test_counters_out_of_reach_are_asked_again_not_skipped() -> None:
    answers = Answers(QuotaUnavailable("down"), QuotaUnavailable("down"), HELD)
    assert await _admission(answers).admit(REQUEST, lambda: False) is HELD
    assert answers.asked == 3


@pytest.mark.parametrize(
    "over",
    [
        Exceeded("monthly_tokens", 300, 295, 9, 3600, "tenant acme"),  # the month's budget spent
        Exceeded("tokens", 5, 0, 9, None, "tenant acme"),  # larger than the limit itself
    ],
)
async def test_a_line_that_can_never_fit_is_refused_in_words(over: Exceeded) -> None:
    with pytest.raises(LineRefused) as refused:
        await _admission(Answers(over)).admit(REQUEST, lambda: False)
    assert refused.value.code == QUOTA_EXCEEDED and str(refused.value) == over.message


async def test_a_stopped_job_stops_waiting() -> None:
    answers = Answers(Exceeded("requests", 1, 1, 1, 60, "tenant acme"))
    stop_at = time.monotonic() + 0.3
    started = time.monotonic()
    assert await _admission(answers).admit(REQUEST, lambda: time.monotonic() > stop_at) is None
    assert time.monotonic() - started < 2
