-- Every poll asks for filters that are pending or whose lease has expired (store::sql::LEASABLE)
-- and for the leases its worker holds (store::sql::WORKER_LEASES). Without these indexes the
-- first read the deadline of every leased row from the table and the second every leased row's
-- worker: with 4,000 filters under lease (a thousand workers) that was 0.4 ms a poll, the
-- costliest statement of the run.
CREATE INDEX filters_expiry ON filters (run_id, state, lease_deadline_ms);
CREATE INDEX filters_worker ON filters (run_id, worker, state);
