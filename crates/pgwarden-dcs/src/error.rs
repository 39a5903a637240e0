//! What a store operation can fail with.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    /// The store did not answer within the bound.
    #[error("the consensus store did not answer within {}", pgwarden_core::format_duration(*.0))]
    Timeout(Duration),
    /// The store cannot be reached.
    #[error("the consensus store is unreachable: {0}")]
    Unavailable(String),
    /// A lease that has expired or was revoked.
    #[error("lease {0} is gone")]
    LeaseGone(i64),
    /// A value in the store that does not parse.
    #[error("key {key} holds an invalid value: {source}")]
    BadValue {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DcsError {
    /// Whether trying again may succeed (the agent keeps its loop going).
    pub fn is_retryable(&self) -> bool {
        match self {
            DcsError::Timeout(_) | DcsError::Unavailable(_) => true,
            DcsError::LeaseGone(_) | DcsError::BadValue { .. } => false,
        }
    }
}
