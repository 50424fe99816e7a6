//! Identifiers of the domain: runs and providers.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifier of one agent run.
///
/// A UUID newtype; [`Display`](fmt::Display) prints the bare UUID, so a run room
/// displays as `run:{uuid}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId(Uuid);

impl RunId {
    /// Mints a new, time-ordered (UUIDv7) run id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing [`Uuid`].
    #[must_use]
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// Views the underlying [`Uuid`].
    #[must_use]
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Uuid> for RunId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl From<RunId> for Uuid {
    fn from(value: RunId) -> Self {
        value.0
    }
}

/// Identifier of a model provider (`"openai"`, `"anthropic"`, a host's own name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProviderId(String);

impl ProviderId {
    /// Wraps a provider name.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// Views the provider name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ProviderId {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for ProviderId {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_displays_as_bare_uuid() {
        let uuid = Uuid::nil();
        assert_eq!(
            RunId::from_uuid(uuid).to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn run_ids_are_time_ordered_v7() {
        let a = RunId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn provider_id_displays_its_name() {
        assert_eq!(ProviderId::new("acme").to_string(), "acme");
    }
}
