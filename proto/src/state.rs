//! Where a filter of a run stands. The store keeps it in `filters.state`, spelt as
//! [`FilterState::name`]; the viewer's status adds `dead` (done, but silent throughout).

use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterState {
    /// Not computed yet, or its lease expired: the next poll may lease it.
    Pending,
    /// Handed to a worker until its lease's deadline.
    Leased,
    /// Its result is recorded.
    Done,
    /// Given up after the run's attempt limit, with the reason recorded.
    Failed,
}

impl FilterState {
    pub const ALL: [FilterState; 4] = [
        FilterState::Pending,
        FilterState::Leased,
        FilterState::Done,
        FilterState::Failed,
    ];

    /// The name stored in SQL (`filters.state`) and shown to users.
    pub fn name(&self) -> &'static str {
        match self {
            FilterState::Pending => "pending",
            FilterState::Leased => "leased",
            FilterState::Done => "done",
            FilterState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for FilterState {
    type Err = Error;

    fn from_str(s: &str) -> Result<FilterState, Error> {
        FilterState::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown filter state '{s}' (the states are pending, leased, done, failed)"
                ))
            })
    }
}
