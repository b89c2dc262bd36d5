"""Inference workers: enriched requests → micro-batched generation (llama.cpp or vLLM) → answers."""
