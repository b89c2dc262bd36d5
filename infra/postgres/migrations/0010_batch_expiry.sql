-- Batches expire (producers/gateway/batches.py): a batch not finished by its expires_at (its
-- completion window from creation) ends `expired`, stamped here, its unanswered lines in the error
-- file as `batch_expired`.
ALTER TABLE batches ADD COLUMN expired_at timestamptz;
