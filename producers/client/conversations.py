"""Conversation memory of one client: the last turns of each conversation, bounded in size.

A client acts as one tenant, and keys each conversation by (user, conversation_id): the same
conversation id under two users, or under two tenants (two clients), shares nothing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from schemas import ChatMessage


class Conversations:
    def __init__(self, max_conversations: int = 1000, max_turns: int = 10) -> None:
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self._data: OrderedDict[Hashable, list[ChatMessage]] = OrderedDict()

    def history(self, conversation_id: Hashable | None) -> list[ChatMessage]:
        if conversation_id is None or conversation_id not in self._data:
            return []
        self._data.move_to_end(conversation_id)
        return list(self._data[conversation_id])

    def record(self, conversation_id: Hashable | None, question: str, answer: str) -> None:
        if conversation_id is None:
            return
        turns = self._data.setdefault(conversation_id, [])
        turns += [ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
        del turns[: max(0, len(turns) - 2 * self.max_turns)]
        self._data.move_to_end(conversation_id)
        while len(self._data) > self.max_conversations:
            self._data.popitem(last=False)
