"""The retrieval processor: micro-batches of questions in, questions with their context out."""
