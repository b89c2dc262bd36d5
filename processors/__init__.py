"""Knowledge processors: document ingestion (parse, chunk, embed, upsert into Milvus) and the
retrieval processor (questions in, questions with their retrieved context out).

Both run in one process (`ragbus processors run`), sharing one embedding model and one Milvus
client: Milvus Lite allows one process per data file.
"""
