"""OpenAI's chat-completions protocol as ragbus serves it, shared by the gateway (HTTP) and bulk
jobs (Batch files): the same request model validates both, and one conversion makes the
ChatRequest, so a body the gateway accepts is a batch line bulk accepts, and the reverse."""
