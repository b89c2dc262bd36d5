"""Ways in, each a producer of requests that waits for their replies: the chat client over the
bus (`client`), the OpenAI-compatible gateway on it (`gateway`), bulk Q&A jobs (`bulk`) and the
ingest client (`ingest`). What they share is here once: the request builder (`requests`), the
reply reader (`replies`) and OpenAI's protocol (`openai`), spoken by the gateway and bulk jobs."""
