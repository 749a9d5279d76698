-- Dataset examples (`vgg-atlas examples`): the real images that excite each filter most.
-- A *pass* runs every image of a folder once through the network's conv layers; its id is a hash
-- of what changes its figures (the weights, the folder, the image side, K), so running the same
-- command again resumes it. Images are leased in batches like a render's filters.

CREATE TABLE example_passes (
    pass_id        TEXT PRIMARY KEY,
    folder         TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    side           INT NOT NULL CHECK (side >= 16),
    top            INT NOT NULL CHECK (top >= 1),
    max_attempts   INT NOT NULL CHECK (max_attempts >= 1),
    created_at_ms  BIGINT NOT NULL
);

-- One row per file of the folder (`image`: its path relative to the folder, with '/'):
-- pending, leased, done, or skipped with the reason (not an image, truncated, unreadable, or it
-- failed `max_attempts` leases). `sha256` is the bytes' hash, recorded when it was read.
CREATE TABLE images (
    pass_id           TEXT NOT NULL REFERENCES example_passes (pass_id),
    image             TEXT NOT NULL,
    state             TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'done', 'skipped')),
    attempts          INT NOT NULL DEFAULT 0,
    lease_id          TEXT,
    lease_deadline_ms BIGINT,
    sha256            TEXT,
    reason            TEXT,
    finished_at_ms    BIGINT,
    PRIMARY KEY (pass_id, image)
);
CREATE INDEX images_leasing ON images (pass_id, state, image);
CREATE INDEX images_lease_id ON images (lease_id);

-- The running top K of each filter: the images with its highest activations (post-ReLU spatial
-- mean, as for rendered filters), the strongest position (y, x) in the layer's feature map, its
-- receptive field in the fitted image (crop_left, crop_top, crop_width, crop_height) and that
-- crop as a PNG (scaled down to at most 96 px). The crop is made once every image is through
-- the network, for the examples that are still in a top K then (NULL until then): most
-- images that enter a top K early fall out of it later.
CREATE TABLE examples (
    pass_id     TEXT NOT NULL REFERENCES example_passes (pass_id),
    layer       TEXT NOT NULL,
    layer_index INT NOT NULL,
    filter      INT NOT NULL,
    image       TEXT NOT NULL,
    activation  REAL NOT NULL,
    y           INT NOT NULL,
    x           INT NOT NULL,
    crop_left   INT NOT NULL,
    crop_top    INT NOT NULL,
    crop_width  INT NOT NULL,
    crop_height INT NOT NULL,
    crop        BLOB,
    PRIMARY KEY (pass_id, layer, filter, image)
);

-- Each filter's examples with their rank: 1 = the image it responds to most.
CREATE VIEW filter_examples AS
SELECT pass_id, layer, layer_index, filter,
       ROW_NUMBER() OVER (PARTITION BY pass_id, layer, filter
                          ORDER BY activation DESC, image) AS rank,
       image, activation, y, x, crop_left, crop_top, crop_width, crop_height, crop
FROM examples;

-- Each image's K strongest filters of every conv layer, ranked within the layer (1 = the
-- strongest). Fixed once the image is done, so the rank is stored.
CREATE TABLE image_filters (
    pass_id     TEXT NOT NULL REFERENCES example_passes (pass_id),
    image       TEXT NOT NULL,
    layer       TEXT NOT NULL,
    layer_index INT NOT NULL,
    filter      INT NOT NULL,
    activation  REAL NOT NULL,
    rank        INT NOT NULL,
    PRIMARY KEY (pass_id, image, layer, filter)
);
