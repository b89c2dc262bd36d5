"""Document ingestion: the stage that indexes DocumentIngest events (`stage`); the client side
that turns files into them and waits for their results is producers.ingest."""
