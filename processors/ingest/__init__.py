"""Document ingestion: the stage that indexes DocumentIngest events (`stage`) and the client side
that turns files into them and waits for their results (`client`)."""
