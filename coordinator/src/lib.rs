//! Run planning, task leasing and result recording; filled by the coordinator issue.
