"""The inference worker: consumer loop, batching, transactional publishing."""
