//! Pure image work: tiles to per-layer mosaics, overview and viewer; filled by the atlas issue.
