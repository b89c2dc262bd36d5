"""Bulk document Q&A jobs: OpenAI Batch files (or plain questions) in, one answer line per id out."""
