-- Each result's border ratio: the mean gradient magnitude of its image in the outer 8 px over
-- the mean in the rest (vgg_atlas_atlas::quality::border_ratio), computed by the coordinator from
-- the submitted PNG. About 1 when the borders look like the middle; well above 1 when they are
-- busier (the network's zero padding shows, not the filter). NULL for results stored before this
-- column existed: nothing is recomputed for them.
ALTER TABLE results ADD COLUMN border_ratio REAL;

-- A layer's border ratios without reading its rows: the new column comes after `png`, and SQLite
-- reaches a column behind a large blob only by walking the blob's overflow pages, which made
-- layer_summary (read by every progress poll) 0.5 s instead of 0.07 s on a full run's database.
CREATE INDEX results_border_ratio ON results (run_id, layer, border_ratio, filter);

-- layer_summary again, with every column of 0001 in the same order and four more at the end:
-- - `median_activation`: the median activation of the layer's finished filters;
-- - `weak`: finished filters whose activation is under 0.2 x that median (quality::WEAK_FRACTION:
--   they read as grey tiles; dead filters, activation 0, are weak too);
-- - `median_border_ratio`, `max_border_ratio`: over the finished filters that have a border
--   ratio (NULL when none has one, e.g. a layer stored before this migration).
-- SQLite has no median aggregate and PostgreSQL's (percentile_cont) is not SQLite's, so the
-- median is taken by hand, the same way on both: number the layer's values 1..n in order
-- (ROW_NUMBER) next to their count n (COUNT over the same window), keep the middle row (n odd:
-- i = (n + 1) / 2) or the two middle rows (n even: i = n / 2 and n / 2 + 1), i.e. the rows with
-- 2i in {n, n + 1, n + 2}, and average them: quality::median's meaning. Ties are ordered by filter
-- so the numbering is total. Border ratios are numbered among the non-NULL ones only (the two
-- databases sort NULL at opposite ends). The figures are subqueries on one run and layer each,
-- so `WHERE run_id = ...` reads only that run's results.
DROP VIEW layer_summary;

CREATE VIEW layer_summary AS
SELECT run_id, layer, layer_index, filters, done, pending, leased, failed, dead,
       mean_activation, max_activation, median_activation,
       (SELECT COUNT(*) FROM results w
        WHERE w.run_id = s.run_id AND w.layer = s.layer
          AND w.activation < 0.2 * s.median_activation) AS weak,
       median_border_ratio, max_border_ratio
FROM (
    SELECT f.run_id, f.layer, f.layer_index,
           COUNT(*) AS filters,
           SUM(CASE WHEN f.state = 'done' THEN 1 ELSE 0 END) AS done,
           SUM(CASE WHEN f.state = 'pending' THEN 1 ELSE 0 END) AS pending,
           SUM(CASE WHEN f.state = 'leased' THEN 1 ELSE 0 END) AS leased,
           SUM(CASE WHEN f.state = 'failed' THEN 1 ELSE 0 END) AS failed,
           SUM(CASE WHEN r.dead THEN 1 ELSE 0 END) AS dead,
           AVG(r.activation) AS mean_activation,
           MAX(r.activation) AS max_activation,
           (SELECT AVG(activation)
            FROM (SELECT activation,
                         ROW_NUMBER() OVER (ORDER BY activation, filter) AS i,
                         COUNT(*) OVER () AS n
                  FROM results m
                  WHERE m.run_id = f.run_id AND m.layer = f.layer) ranked
            WHERE 2 * i IN (n, n + 1, n + 2)) AS median_activation,
           (SELECT AVG(border_ratio)
            FROM (SELECT border_ratio,
                         ROW_NUMBER() OVER (ORDER BY border_ratio, filter) AS i,
                         COUNT(*) OVER () AS n
                  FROM results m
                  WHERE m.run_id = f.run_id AND m.layer = f.layer
                    AND m.border_ratio IS NOT NULL) ranked
            WHERE 2 * i IN (n, n + 1, n + 2)) AS median_border_ratio,
           (SELECT MAX(border_ratio) FROM results m
            WHERE m.run_id = f.run_id AND m.layer = f.layer) AS max_border_ratio
    FROM filters f
    LEFT JOIN results r ON r.run_id = f.run_id AND r.layer = f.layer AND r.filter = f.filter
    GROUP BY f.run_id, f.layer, f.layer_index
) s;
