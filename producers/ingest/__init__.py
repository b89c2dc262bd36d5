"""The producing side of ingestion: files become DocumentIngest events, and their IngestResults
are awaited (the stage that indexes them is processors.ingest)."""
