-- One word per concept: a result's PNG bytes are `png`, as on the wire and in the code (the
-- word `image` is left for the real images of dataset examples).
ALTER TABLE results RENAME COLUMN image TO png;

-- Steps the worker retried with a smaller step after a non-finite value (0 for results stored
-- before this column existed); the viewer shows it.
ALTER TABLE results ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
