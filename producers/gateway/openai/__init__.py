"""POST /v1/chat/completions and GET /v1/models: the protocol (OpenAI's shapes) beside the serving side."""
