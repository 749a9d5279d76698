-- The store of vgg-atlas (PostgreSQL dialect; migrations/sqlite holds the same schema).
-- Times are unix milliseconds; the views add nothing that is not derivable from the tables.

-- One row per run: everything that changes the output is in `settings` (JSON), so the run id
-- (a hash of it) identifies the run and rendering the same settings again resumes it.
CREATE TABLE runs (
    run_id         TEXT PRIMARY KEY,
    weights_sha256 TEXT NOT NULL,
    settings       TEXT NOT NULL,
    max_attempts   INT NOT NULL CHECK (max_attempts >= 1),
    created_at_ms  BIGINT NOT NULL
);

-- One row per filter of a run: its place in the plan and its lease state.
CREATE TABLE filters (
    run_id            TEXT NOT NULL REFERENCES runs (run_id),
    layer             TEXT NOT NULL,
    layer_index       INT NOT NULL,
    filter            INT NOT NULL,
    seed              BIGINT NOT NULL,
    state             TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'done', 'failed')),
    attempts          INT NOT NULL DEFAULT 0,
    lease_id          TEXT,
    worker            TEXT,
    lease_deadline_ms BIGINT,
    failed_reason     TEXT,
    PRIMARY KEY (run_id, layer, filter)
);
-- Leasing asks for "the first pending (or expired) filters of the lowest layer".
CREATE INDEX filters_leasing ON filters (run_id, state, layer_index, filter);
-- Heartbeats and submissions find a lease's filters by its id.
CREATE INDEX filters_lease_id ON filters (lease_id);

-- One row per finished filter: scores and the image, written with the state in one transaction.
CREATE TABLE results (
    run_id           TEXT NOT NULL,
    layer            TEXT NOT NULL,
    filter           INT NOT NULL,
    activation       REAL NOT NULL,
    objective        REAL NOT NULL,
    start_activation REAL NOT NULL,
    curve            TEXT NOT NULL, -- JSON array: the objective after each ascent step
    seconds          REAL NOT NULL,
    dead             BOOLEAN NOT NULL,
    worker           TEXT NOT NULL,
    image            BYTEA NOT NULL, -- PNG bytes
    finished_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (run_id, layer, filter),
    FOREIGN KEY (run_id, layer, filter) REFERENCES filters (run_id, layer, filter)
);

-- Every finished filter with its rank in its layer: 1 = the strongest activation.
CREATE VIEW best_filters AS
SELECT r.run_id, r.layer, f.layer_index, r.filter, r.activation, r.start_activation, r.dead,
       ROW_NUMBER() OVER (PARTITION BY r.run_id, r.layer
                          ORDER BY r.activation DESC, r.filter) AS rank
FROM results r
JOIN filters f ON f.run_id = r.run_id AND f.layer = r.layer AND f.filter = r.filter;

-- Per run and layer: how many filters are in each state, and the scores of the finished ones.
-- `dead` counts finished filters that stayed silent (they are also counted in `done`).
CREATE VIEW layer_summary AS
SELECT f.run_id, f.layer, f.layer_index,
       COUNT(*) AS filters,
       SUM(CASE WHEN f.state = 'done' THEN 1 ELSE 0 END) AS done,
       SUM(CASE WHEN f.state = 'pending' THEN 1 ELSE 0 END) AS pending,
       SUM(CASE WHEN f.state = 'leased' THEN 1 ELSE 0 END) AS leased,
       SUM(CASE WHEN f.state = 'failed' THEN 1 ELSE 0 END) AS failed,
       SUM(CASE WHEN r.dead THEN 1 ELSE 0 END) AS dead,
       AVG(r.activation) AS mean_activation,
       MAX(r.activation) AS max_activation
FROM filters f
LEFT JOIN results r ON r.run_id = f.run_id AND r.layer = f.layer AND r.filter = f.filter
GROUP BY f.run_id, f.layer, f.layer_index;

-- Filters without a useful image: failed for good (with the reason), or finished but dead.
CREATE VIEW failed_filters AS
SELECT run_id, layer, filter, 'failed' AS status, attempts, failed_reason AS reason
FROM filters
WHERE state = 'failed'
UNION ALL
SELECT f.run_id, f.layer, f.filter, 'dead' AS status, f.attempts,
       'dead: activation stayed 0 from the start image on (a silent filter gets no gradient)' AS reason
FROM results r
JOIN filters f ON f.run_id = r.run_id AND f.layer = r.layer AND f.filter = r.filter
WHERE r.dead;
