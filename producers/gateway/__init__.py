"""The OpenAI-compatible HTTP gateway: requests travel over Kafka like every other producer's,
so they are retrieved-for and audited."""
