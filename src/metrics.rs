//! What the hub and the store report through the [`metrics`] facade. A host
//! that installs a recorder (a Prometheus exporter, say) gets these; one
//! that installs none pays next to nothing.
//!
//! | name                              | kind      | what                                        |
//! |-----------------------------------|-----------|---------------------------------------------|
//! | `behest_events_published_total`   | counter   | events a run room sequenced                 |
//! | `behest_events_persisted_total`   | counter   | events the store committed                  |
//! | `behest_events_delivered_total`   | counter   | envelopes handed to subscribers             |
//! | `behest_catch_ups_total`          | counter   | subscriber catch-ups, label `from`: `ring` or `store` |
//! | `behest_rooms_started_total`      | counter   | rooms started (first use, or after a stop)  |
//! | `behest_rooms_evicted_total`      | counter   | idle rooms stopped                          |
//! | `behest_room_failures_total`      | counter   | rooms that failed (each restarts on next use) |
//! | `behest_commit_events`            | histogram | events per store commit                     |
//! | `behest_commit_seconds`           | histogram | one store commit, write and flush           |
//! | `behest_runs_removed_total`       | counter   | runs retention removed                      |

pub(crate) const PUBLISHED: &str = "behest_events_published_total";
pub(crate) const PERSISTED: &str = "behest_events_persisted_total";
pub(crate) const DELIVERED: &str = "behest_events_delivered_total";
pub(crate) const CATCH_UPS: &str = "behest_catch_ups_total";
pub(crate) const ROOMS_STARTED: &str = "behest_rooms_started_total";
pub(crate) const ROOMS_EVICTED: &str = "behest_rooms_evicted_total";
pub(crate) const ROOM_FAILURES: &str = "behest_room_failures_total";
pub(crate) const COMMIT_EVENTS: &str = "behest_commit_events";
pub(crate) const COMMIT_SECONDS: &str = "behest_commit_seconds";
pub(crate) const RUNS_REMOVED: &str = "behest_runs_removed_total";
