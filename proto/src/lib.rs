//! The wire contract between coordinator and workers (`atlas.v1`); filled by the coordinator issue.
