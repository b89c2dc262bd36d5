"""Async chat over the message bus: `async with ChatClient(settings) as c: await c.ask(...)`."""

from producers.client.chat import ChatClient, ChatStream
from producers.client.errors import ChatError, ChatTimeout

__all__ = ["ChatClient", "ChatError", "ChatStream", "ChatTimeout"]
