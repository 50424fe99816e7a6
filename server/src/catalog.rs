//! The streams that exist: path, run, configuration, fork point, and what
//! deleting and forking did to them.
//!
//! The catalog is a plain map. The server keeps it in memory and writes
//! every change as a [`Record`] to a run of its own before applying it, so
//! reopening the store and replaying those records rebuilds it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use behest_stream::RunId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `CustomEvent::kind` of a catalog record.
pub(crate) const KIND: &str = "durable_streams.catalog";

/// A stream's configuration, as a `PUT` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StreamConfig {
    /// Media type, lowercased, parameters kept as sent.
    pub(crate) content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) expires_at: Option<DateTime<Utc>>,
}

impl StreamConfig {
    /// The media type without parameters: what appends must match.
    pub(crate) fn essence(&self) -> &str {
        essence(&self.content_type)
    }

    /// Whether the stream keeps JSON messages.
    pub(crate) fn is_json(&self) -> bool {
        self.essence() == "application/json"
    }
}

/// A media type without its parameters, as compared by the protocol.
pub(crate) fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Where a fork starts: its parent's run and the position it forked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ForkPoint {
    pub(crate) parent: RunId,
    pub(crate) at: u64,
    /// Messages (JSON) or bytes of the parent's next append that the fork
    /// copied into its own run when it was created.
    #[serde(default)]
    pub(crate) sub_offset: u64,
}

/// A change to the catalog, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Record {
    Create {
        path: String,
        run: RunId,
        config: StreamConfig,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fork: Option<ForkPoint>,
    },
    Delete {
        run: RunId,
    },
}

/// A stream in the catalog.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) path: String,
    pub(crate) run: RunId,
    pub(crate) config: StreamConfig,
    pub(crate) fork: Option<ForkPoint>,
    /// Deleted while forks still read it: its path answers 410 and cannot
    /// be created again until the last fork goes.
    pub(crate) deleted: bool,
    /// Live forks whose reads go through this stream.
    forks: usize,
    /// Last read or write, for a sliding TTL.
    touched: Instant,
}

impl Entry {
    /// Whether the stream's TTL or expiry time has passed.
    pub(crate) fn is_expired(&self, now: Instant, wall: DateTime<Utc>) -> bool {
        if self.config.expires_at.is_some_and(|at| at <= wall) {
            return true;
        }
        self.config
            .ttl_secs
            .is_some_and(|ttl| now.duration_since(self.touched) >= Duration::from_secs(ttl))
    }
}

/// What a path leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Missing,
    Deleted,
    Live,
}

/// Every stream, by path and by run.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    paths: HashMap<String, RunId>,
    entries: HashMap<RunId, Entry>,
}

impl Catalog {
    /// Applies a record; records that name what is gone change nothing.
    /// Returns the runs it removed from the catalog (a delete, and the
    /// deleted ancestors only that stream still held).
    pub(crate) fn apply(&mut self, record: &Record) -> Vec<RunId> {
        match record {
            Record::Create {
                path,
                run,
                config,
                fork,
            } => {
                if let Some(point) = fork
                    && let Some(parent) = self.entries.get_mut(&point.parent)
                {
                    parent.forks += 1;
                }
                self.paths.insert(path.clone(), *run);
                self.entries.insert(
                    *run,
                    Entry {
                        path: path.clone(),
                        run: *run,
                        config: config.clone(),
                        fork: *fork,
                        deleted: false,
                        forks: 0,
                        touched: Instant::now(),
                    },
                );
                Vec::new()
            }
            Record::Delete { run } => self.delete(*run),
        }
    }

    fn delete(&mut self, run: RunId) -> Vec<RunId> {
        let mut removed = Vec::new();
        let Some(entry) = self.entries.get_mut(&run) else {
            return removed;
        };
        if entry.forks > 0 {
            entry.deleted = true;
            return removed;
        }
        // Gone: release what it forked from, which may let that go too.
        let mut next = Some(run);
        while let Some(run) = next.take() {
            let Some(entry) = self.entries.remove(&run) else {
                break;
            };
            removed.push(run);
            if self.paths.get(&entry.path) == Some(&run) {
                self.paths.remove(&entry.path);
            }
            if let Some(point) = entry.fork
                && let Some(parent) = self.entries.get_mut(&point.parent)
            {
                parent.forks = parent.forks.saturating_sub(1);
                if parent.deleted && parent.forks == 0 {
                    next = Some(point.parent);
                }
            }
        }
        removed
    }

    /// The stream at `path`.
    pub(crate) fn get(&self, path: &str) -> Option<&Entry> {
        self.paths.get(path).and_then(|run| self.entries.get(run))
    }

    /// What `path` leads to.
    pub(crate) fn lookup(&self, path: &str) -> Lookup {
        match self.get(path) {
            None => Lookup::Missing,
            Some(entry) if entry.deleted => Lookup::Deleted,
            Some(_) => Lookup::Live,
        }
    }

    /// The stream whose run is `run`, deleted or not.
    pub(crate) fn by_run(&self, run: RunId) -> Option<&Entry> {
        self.entries.get(&run)
    }

    /// Marks a read or write of `path` for its sliding TTL.
    pub(crate) fn touch(&mut self, path: &str) {
        if let Some(run) = self.paths.get(path)
            && let Some(entry) = self.entries.get_mut(run)
        {
            entry.touched = Instant::now();
        }
    }

    /// The live streams whose TTL or expiry time has passed.
    pub(crate) fn expired(
        &self,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> impl Iterator<Item = &Entry> {
        self.entries
            .values()
            .filter(move |e| !e.deleted && e.is_expired(now, wall))
    }

    /// How many streams the catalog holds (deleted ones forks still read
    /// included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(catalog: &mut Catalog, path: &str, fork: Option<ForkPoint>) -> RunId {
        let run = RunId::new();
        catalog.apply(&Record::Create {
            path: path.into(),
            run,
            config: StreamConfig {
                content_type: "text/plain".into(),
                ttl_secs: None,
                expires_at: None,
            },
            fork,
        });
        run
    }

    #[test]
    fn a_deleted_source_lives_while_forks_read_it_and_goes_with_the_last() {
        let mut c = Catalog::default();
        let a = create(&mut c, "a", None);
        let b = create(
            &mut c,
            "b",
            Some(ForkPoint {
                parent: a,
                at: 1,
                sub_offset: 0,
            }),
        );
        let d = create(
            &mut c,
            "d",
            Some(ForkPoint {
                parent: b,
                at: 2,
                sub_offset: 0,
            }),
        );
        c.apply(&Record::Delete { run: a });
        assert_eq!(c.lookup("a"), Lookup::Deleted);
        c.apply(&Record::Delete { run: b });
        assert_eq!(c.lookup("b"), Lookup::Deleted);
        assert!(c.by_run(a).is_some());
        let removed = c.apply(&Record::Delete { run: d });
        assert_eq!(removed, [d, b, a]);
        assert_eq!(c.len(), 0);
        assert_eq!(c.lookup("a"), Lookup::Missing);
        // A path deleted whole can be created again.
        create(&mut c, "a", None);
        assert_eq!(c.lookup("a"), Lookup::Live);
    }

    #[test]
    fn content_types_compare_without_parameters() {
        assert_eq!(
            essence("application/json; charset=utf-8"),
            "application/json"
        );
        assert_eq!(essence("text/plain"), "text/plain");
    }
}
