"""Ways in: the chat client over the bus, bulk Q&A jobs, the OpenAI-compatible gateway."""
