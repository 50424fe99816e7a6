//! The commit log: what makes a group commit cost one sled key, however many
//! runs it carries.
//!
//! sled pays a large cost per key written (a commit of 256 keys costs about
//! fourteen times a commit of the same bytes under one key), so a commit
//! that wrote a segment per run paid per run. Instead a commit writes one
//! *commit record* (`w` key, numbered in commit order) holding every run's
//! new envelopes as opaque bytes, and the log keeps those envelopes in
//! memory, by run, until they are *compacted*: written as one segment per
//! run (`e` keys, as before) in one batch that also deletes the records they
//! came from. A run appending one event per commit then costs a key per
//! compaction, not per commit.
//!
//! Readers see a run's segments followed by its envelopes here, under the
//! commit gate, so compaction changes nothing they can observe. After a
//! crash, opening the store compacts whatever records remain
//! ([`CommitLog::recover`]); a store closed cleanly has none.
//!
//! A record's value: the format-version byte, then for each run its id (16
//! bytes), the seq of its first envelope (u64, big-endian) and its envelope
//! count (u32, BE), then each envelope as a length (u32, BE) and its bytes.
//! The bytes are what the layer above encoded; the log does not look inside.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::layout;
use crate::codec::{CodecError, FORMAT_VERSION};
use crate::ids::RunId;

/// Compact once the log holds this many bytes of envelopes: its memory
/// bound, less one commit.
pub(crate) const COMPACT_BYTES: usize = 8 * 1024 * 1024;

/// Compact once this many records wait: bounds the keys a compaction
/// deletes, and the records an open after a crash reads.
pub(crate) const COMPACT_RECORDS: u64 = 512;

/// One envelope the log holds: its seq and its encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    pub(crate) seq: u64,
    pub(crate) bytes: Vec<u8>,
}

/// Envelopes of a range of records, by run.
#[derive(Debug, Default)]
pub(crate) struct Generation {
    runs: HashMap<RunId, Vec<Logged>>,
    bytes: usize,
    /// The first record it holds.
    first_record: u64,
    /// The record after its last (once it is compacting; until then the
    /// log's next record).
    end_record: u64,
}

impl Generation {
    fn run(&self, run_id: RunId) -> &[Logged] {
        self.runs.get(&run_id).map_or(&[], Vec::as_slice)
    }

    /// Every run it holds, with its envelopes in seq order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (&RunId, &Vec<Logged>)> {
        self.runs.iter()
    }

    /// The keys of the records it came from: `first..end`.
    pub(crate) fn record_keys(&self) -> std::ops::Range<[u8; 9]> {
        layout::commit_key(self.first_record)..layout::commit_key(self.end_record)
    }
}

/// Envelopes committed through records and not yet compacted, by run: the
/// generation commits add to, and the one being compacted, if any. A
/// compaction runs off the commit path: the commit that fills the log
/// starts it ([`CommitLog::start_compaction`]) and the next commits go on
/// into a new generation while it writes.
#[derive(Debug, Default)]
pub(crate) struct CommitLog {
    current: Generation,
    /// Being written as segments (or failed to be, and waiting for another
    /// try). Readers still read it: until it is forgotten, its envelopes
    /// may be in sled twice over, and readers skip seqs they have.
    compacting: Option<Arc<Generation>>,
    /// A compaction of `compacting` is under way.
    running: bool,
    /// The number the next record gets.
    next_record: u64,
    /// Held by whoever writes a compaction, so that a compaction that must
    /// finish now (close, retention) waits for one under way.
    compactor: Arc<Mutex<()>>,
}

impl CommitLog {
    /// The key of the `index`th record of the next commit.
    pub(crate) fn next_key(&self, index: usize) -> [u8; 9] {
        layout::commit_key(self.next_record.saturating_add(index as u64))
    }

    /// Takes in what the next commit's `records` records hold, once sled
    /// has them. Each run's envelopes follow the ones the log already holds.
    pub(crate) fn committed(
        &mut self,
        runs: impl IntoIterator<Item = (RunId, Vec<Logged>)>,
        records: u64,
    ) {
        for (run_id, logged) in runs {
            self.current.bytes += logged.iter().map(|l| l.bytes.len()).sum::<usize>();
            self.current.runs.entry(run_id).or_default().extend(logged);
        }
        self.next_record += records;
        self.current.end_record = self.next_record;
    }

    /// Whether the generation commits add to holds enough to compact.
    pub(crate) fn full(&self) -> bool {
        self.current.bytes >= COMPACT_BYTES
            || self.next_record - self.current.first_record >= COMPACT_RECORDS
    }

    /// Whether there is nothing to compact.
    pub(crate) fn is_empty(&self) -> bool {
        self.compacting.is_none() && self.current.first_record == self.next_record
    }

    /// The run's envelopes the log holds, in seq order.
    pub(crate) fn run(&self, run_id: RunId) -> impl Iterator<Item = &Logged> {
        let compacting = self
            .compacting
            .as_deref()
            .map_or(&[][..], |g| g.run(run_id));
        compacting.iter().chain(self.current.run(run_id))
    }

    /// The last seq the log holds for the run.
    pub(crate) fn last_seq(&self, run_id: RunId) -> Option<u64> {
        self.current
            .run(run_id)
            .last()
            .or_else(|| self.compacting.as_deref()?.run(run_id).last())
            .map(|l| l.seq)
    }

    /// Whether the generation being compacted holds any of the run.
    pub(crate) fn compacting_holds(&self, run_id: RunId) -> bool {
        self.compacting
            .as_deref()
            .is_some_and(|g| g.runs.contains_key(&run_id))
    }

    /// Takes the run's envelopes out of the generation commits add to, for
    /// a commit that writes them as segments itself. Their records stay
    /// until that generation is compacted; recovery skips what the
    /// segments already hold.
    pub(crate) fn take_run(&mut self, run_id: RunId) -> Vec<Logged> {
        let taken = self.current.runs.remove(&run_id).unwrap_or_default();
        self.current.bytes -= taken.iter().map(|l| l.bytes.len()).sum::<usize>();
        taken
    }

    /// What a background compaction should write now, if anything: the
    /// generation that failed to compact before, or, once the log is full,
    /// the current one (commits then go on into a new one). `None` while
    /// one is under way.
    pub(crate) fn start_compaction(&mut self) -> Option<Arc<Generation>> {
        if self.running {
            return None;
        }
        if self.compacting.is_none() {
            if !self.full() {
                return None;
            }
            let next = Generation {
                first_record: self.next_record,
                end_record: self.next_record,
                ..Generation::default()
            };
            self.compacting = Some(Arc::new(std::mem::replace(&mut self.current, next)));
        }
        self.running = true;
        self.compacting.clone()
    }

    /// A background compaction of `generation` ended: written (forget it)
    /// or failed (keep it, for readers and for the next try).
    pub(crate) fn compaction_ended(&mut self, generation: &Arc<Generation>, written: bool) {
        // A stale task (its generation compacted at once meanwhile) must
        // not end the compaction of a newer one.
        if !self.is_compacting(generation) {
            return;
        }
        self.running = false;
        if written {
            self.compacting = None;
        }
    }

    /// Whether the generation commits add to holds so much more than a
    /// compaction takes (one is under way, or keeps failing) that the
    /// commit must compact before it goes on: bounds the log's memory.
    pub(crate) fn overfull(&self) -> bool {
        self.current.bytes >= 2 * COMPACT_BYTES
            || self.next_record - self.current.first_record >= 2 * COMPACT_RECORDS
    }

    /// Everything the log holds, oldest generation first: what a
    /// compaction that must finish now writes. Call with the compactor
    /// held (no background compaction under way).
    pub(crate) fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.compacting
            .as_deref()
            .into_iter()
            .chain([&self.current])
    }

    /// Whether `generation` is still the one to compact: a compaction that
    /// had to finish at once may have written it meanwhile.
    pub(crate) fn is_compacting(&self, generation: &Arc<Generation>) -> bool {
        self.compacting
            .as_ref()
            .is_some_and(|g| Arc::ptr_eq(g, generation))
    }

    /// Forgets everything, once a compaction of [`Self::generations`] is
    /// written. A background compaction that was about to start finds its
    /// generation gone and does nothing.
    pub(crate) fn compacted(&mut self) {
        self.running = false;
        self.compacting = None;
        self.current = Generation {
            first_record: self.next_record,
            end_record: self.next_record,
            ..Generation::default()
        };
    }

    /// The lock a compaction holds while it writes.
    pub(crate) fn compactor(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.compactor)
    }

    /// Reads the records a crash left, in commit order, into a log whose
    /// record numbers continue after them. `stored` gives the last seq a
    /// run's segments hold: a commit may have written a run's logged
    /// envelopes as segments and left their records, so what the segments
    /// hold is skipped, and each run must then continue from its segments
    /// without a gap.
    ///
    /// # Errors
    ///
    /// A record that does not decode, or that does not continue its run
    /// where the segments and the records before it left it (naming the
    /// record), or an error of `stored`.
    pub(crate) fn recover(
        records: impl IntoIterator<Item = (u64, Vec<u8>)>,
        mut stored: impl FnMut(RunId) -> Result<u64, String>,
    ) -> Result<Self, String> {
        let mut log = Self::default();
        let mut first = None;
        let mut in_segments: HashMap<RunId, u64> = HashMap::new();
        for (number, value) in records {
            first.get_or_insert(number);
            let damaged = |e: CodecError| format!("commit record {number} is damaged: {e}");
            let mut runs = decode_record(&value).map_err(damaged)?;
            for (run_id, logged) in &mut runs {
                let upto = match in_segments.get(run_id) {
                    Some(upto) => *upto,
                    None => *in_segments.entry(*run_id).or_insert(stored(*run_id)?),
                };
                logged.retain(|l| l.seq > upto);
                let last = log.last_seq(*run_id).unwrap_or(upto);
                if let Some(next) = logged.first()
                    && last.checked_add(1) != Some(next.seq)
                {
                    return Err(damaged(CodecError::Malformed(format!(
                        "run {run_id} continues at seq {} after seq {last}",
                        next.seq
                    ))));
                }
            }
            runs.retain(|(_, logged)| !logged.is_empty());
            log.next_record = number;
            log.committed(runs, 1);
        }
        log.current.first_record = first.unwrap_or(0);
        Ok(log)
    }
}

/// A record holds about this many bytes at most (one envelope larger than
/// this gets a record of its own): below sled's threshold for storing a
/// value in a file of its own, and large enough that a commit of many runs
/// writes few keys.
pub(crate) const RECORD_BYTES: usize = 96 * 1024;

/// Encodes what one commit stores as commit records of about
/// [`RECORD_BYTES`] each: `runs` gives each run's first seq and its
/// envelopes, consecutive seqs from it. A run may continue from one record
/// into the next.
pub(crate) fn encode_records<'a>(
    runs: impl IntoIterator<Item = (RunId, u64, &'a [&'a [u8]])>,
) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut current = vec![FORMAT_VERSION];
    for (run_id, first_seq, envelopes) in runs {
        // Where the count of the run's part in `current` is, once begun.
        let mut count_at: Option<usize> = None;
        for (index, bytes) in (0u64..).zip(envelopes.iter()) {
            if current.len() > 1 && current.len() + PART_HEADER + 4 + bytes.len() > RECORD_BYTES {
                records.push(std::mem::replace(&mut current, vec![FORMAT_VERSION]));
                count_at = None;
            }
            let at = match count_at {
                Some(at) => at,
                None => {
                    current.extend_from_slice(run_id.as_uuid().as_bytes());
                    current.extend_from_slice(&first_seq.saturating_add(index).to_be_bytes());
                    current.extend_from_slice(&0u32.to_be_bytes());
                    *count_at.insert(current.len() - 4)
                }
            };
            let mut count = [0u8; 4];
            count.copy_from_slice(&current[at..at + 4]);
            let count = u32::from_be_bytes(count).saturating_add(1);
            current[at..at + 4].copy_from_slice(&count.to_be_bytes());
            current.extend_from_slice(&len_u32(bytes.len()).to_be_bytes());
            current.extend_from_slice(bytes);
        }
    }
    if current.len() > 1 || records.is_empty() {
        records.push(current);
    }
    records
}

/// A run's part header: its id, first seq and count.
const PART_HEADER: usize = 16 + 8 + 4;

/// Lengths are bounded far below 4 GiB by the hub's event-size limit; a
/// larger one could not have been committed.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Decodes a commit record. Never panics, whatever the bytes.
///
/// # Errors
///
/// A wrong version byte, a truncated record, or seqs past `u64::MAX`.
pub(crate) fn decode_record(value: &[u8]) -> Result<Vec<(RunId, Vec<Logged>)>, CodecError> {
    let (&version, mut rest) = value.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion { found: version });
    }
    let mut runs = Vec::new();
    while !rest.is_empty() {
        let id: [u8; 16] = take(&mut rest, 16)?.try_into().unwrap_or_default();
        let run_id = RunId::from_uuid(Uuid::from_bytes(id));
        let first_seq = u64::from_be_bytes(take(&mut rest, 8)?.try_into().unwrap_or_default());
        let count = u32::from_be_bytes(take(&mut rest, 4)?.try_into().unwrap_or_default());
        // Each envelope takes at least its 4-byte length: a count beyond
        // that is a lie, refused before it sizes an allocation.
        if count as usize > rest.len() / 4 {
            return Err(CodecError::Malformed(format!(
                "commit record claims {count} envelopes in {} bytes",
                rest.len()
            )));
        }
        let mut logged = Vec::with_capacity(count as usize);
        for index in 0..u64::from(count) {
            let seq = first_seq.checked_add(index).ok_or_else(|| {
                CodecError::Malformed(format!("run {run_id} seqs run past {}", u64::MAX))
            })?;
            let len = u32::from_be_bytes(take(&mut rest, 4)?.try_into().unwrap_or_default());
            let bytes = take(&mut rest, len as usize)?.to_vec();
            logged.push(Logged { seq, bytes });
        }
        runs.push((run_id, logged));
    }
    Ok(runs)
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], CodecError> {
    let Some((head, tail)) = rest.split_at_checked(n) else {
        return Err(CodecError::Malformed(format!(
            "commit record truncated: {n} bytes wanted, {} left",
            rest.len()
        )));
    };
    *rest = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(seqs: std::ops::RangeInclusive<u64>) -> Vec<Logged> {
        seqs.map(|seq| Logged {
            seq,
            bytes: vec![seq as u8; seq as usize % 7],
        })
        .collect()
    }

    fn records(runs: &[(RunId, Vec<Logged>)]) -> Vec<Vec<u8>> {
        let parts: Vec<(RunId, u64, Vec<&[u8]>)> = runs
            .iter()
            .map(|(run, l)| {
                (
                    *run,
                    l[0].seq,
                    l.iter().map(|l| l.bytes.as_slice()).collect(),
                )
            })
            .collect();
        encode_records(parts.iter().map(|(r, s, b)| (*r, *s, b.as_slice())))
    }

    fn record(runs: &[(RunId, Vec<Logged>)]) -> Vec<u8> {
        let mut records = records(runs);
        assert_eq!(records.len(), 1);
        records.remove(0)
    }

    #[test]
    fn a_large_commit_is_split_into_records_that_recover_whole() {
        let (a, b) = (RunId::new(), RunId::new());
        let big = |seqs: std::ops::RangeInclusive<u64>| -> Vec<Logged> {
            seqs.map(|seq| Logged {
                seq,
                bytes: vec![seq as u8; 10_000],
            })
            .collect()
        };
        let runs = vec![(a, big(1..=25)), (b, big(4..=30))];
        let split = records(&runs);
        assert!(split.len() > 3, "{} records", split.len());
        assert!(split.iter().all(|r| r.len() <= RECORD_BYTES + 10_032));
        // Run b's segments hold seqs 1..=3.
        let stored = |run: RunId| Ok(if run == b { 3 } else { 0 });
        let log = CommitLog::recover((10..).zip(split.clone()), stored).unwrap();
        assert_eq!(log.run(a).cloned().collect::<Vec<_>>(), big(1..=25));
        assert_eq!(log.run(b).cloned().collect::<Vec<_>>(), big(4..=30));
        let keys = log.generations().next().unwrap().record_keys();
        assert_eq!(keys.start, layout::commit_key(10));
        assert_eq!(keys.end, layout::commit_key(10 + split.len() as u64));
        // One envelope larger than a record still gets one.
        let huge = vec![(
            a,
            vec![Logged {
                seq: 1,
                bytes: vec![1; RECORD_BYTES * 2],
            }],
        )];
        assert_eq!(decode_record(&record(&huge)).unwrap(), huge);
        // An empty commit is one empty record.
        assert_eq!(records(&[]), vec![vec![FORMAT_VERSION]]);
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded() {
        let runs = vec![(RunId::new(), logged(1..=3)), (RunId::new(), logged(7..=7))];
        assert_eq!(decode_record(&record(&runs)).unwrap(), runs);
        assert_eq!(decode_record(&[FORMAT_VERSION]).unwrap(), vec![]);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let bytes = record(&[(RunId::new(), logged(1..=4))]);
        // Every cut but the one after the version byte (an empty record).
        for cut in (0..bytes.len()).filter(|&cut| cut != 1) {
            assert!(decode_record(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong = bytes.clone();
        wrong[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode_record(&wrong),
            Err(CodecError::UnknownVersion { .. })
        ));
        // A count far beyond the bytes is refused before it allocates.
        let mut huge = bytes;
        huge[25..29].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_record(&huge),
            Err(CodecError::Malformed(_))
        ));
    }

    fn seqs(log: &CommitLog, run: RunId) -> Vec<u64> {
        log.run(run).map(|l| l.seq).collect()
    }

    #[test]
    fn the_log_serves_runs_in_order_and_forgets_what_was_compacted() {
        let (a, b) = (RunId::new(), RunId::new());
        let mut log = CommitLog::default();
        assert!(log.is_empty());
        assert_eq!(log.next_key(0), layout::commit_key(0));
        log.committed([(a, logged(1..=2)), (b, logged(1..=1))], 1);
        log.committed([(a, logged(3..=3))], 1);
        assert_eq!(log.last_seq(a), Some(3));
        assert_eq!(seqs(&log, a), vec![1, 2, 3]);
        assert_eq!(log.last_seq(RunId::new()), None);
        let keys = log.generations().last().unwrap().record_keys();
        assert_eq!(keys, layout::commit_key(0)..layout::commit_key(2));
        log.compacted();
        assert!(log.is_empty());
        assert_eq!(seqs(&log, a), Vec::<u64>::new());
        assert_eq!(log.next_key(1), layout::commit_key(3));
        let keys = log.generations().last().unwrap().record_keys();
        assert_eq!(keys.start, layout::commit_key(2));
    }

    /// A background compaction takes the full generation; commits go on
    /// into a new one; readers see both, in order, until the compaction
    /// ends; a failed one is kept and handed out again.
    #[test]
    fn a_compaction_runs_beside_commits_and_is_retried_after_a_failure() {
        let a = RunId::new();
        let mut log = CommitLog::default();
        log.committed([(a, logged(1..=2))], 1);
        assert!(log.start_compaction().is_none(), "not full yet");
        log.committed([], COMPACT_RECORDS);
        let generation = log.start_compaction().expect("full");
        assert_eq!(
            generation.record_keys(),
            layout::commit_key(0)..layout::commit_key(1 + COMPACT_RECORDS)
        );
        assert!(log.start_compaction().is_none(), "one at a time");
        log.committed([(a, logged(3..=4))], 1);
        assert_eq!(seqs(&log, a), vec![1, 2, 3, 4]);
        assert_eq!(log.last_seq(a), Some(4));

        log.compaction_ended(&generation, false);
        assert_eq!(
            seqs(&log, a),
            vec![1, 2, 3, 4],
            "a failed one stays readable"
        );
        let again = log.start_compaction().expect("retried");
        assert!(Arc::ptr_eq(&again, &generation));
        assert!(log.is_compacting(&again));
        log.compaction_ended(&again, true);
        assert!(!log.is_compacting(&again));
        assert_eq!(seqs(&log, a), vec![3, 4]);
        assert!(!log.is_empty());
        let keys = log.generations().next().unwrap().record_keys();
        assert_eq!(keys.start, layout::commit_key(1 + COMPACT_RECORDS));

        // Compacted at once (close, retention) while one was handed out:
        // the handed-out one is stale, and compactions can start again.
        log.committed([], COMPACT_RECORDS);
        let stale = log.start_compaction().expect("full");
        log.compacted();
        assert!(log.is_empty());
        assert!(!log.is_compacting(&stale));
        log.committed([(a, logged(5..=5))], COMPACT_RECORDS);
        assert!(log.start_compaction().is_some());
    }

    #[test]
    fn recovery_rebuilds_the_log_and_refuses_a_gap() {
        let (a, b) = (RunId::new(), RunId::new());
        let first = record(&[(a, logged(1..=2)), (b, logged(1..=1))]);
        let second = record(&[(a, logged(3..=4))]);
        let log = CommitLog::recover([(5, first.clone()), (6, second)], |_| Ok(0)).unwrap();
        assert_eq!(log.last_seq(a), Some(4));
        assert_eq!(log.last_seq(b), Some(1));
        let keys = log.generations().last().unwrap().record_keys();
        assert_eq!(keys, layout::commit_key(5)..layout::commit_key(7));

        let gap = record(&[(a, logged(6..=6))]);
        let error = CommitLog::recover([(5, first.clone()), (6, gap)], |_| Ok(0)).unwrap_err();
        assert!(error.contains("commit record 6"), "{error}");

        // What the segments hold is skipped before continuity is checked:
        // a run whose seqs 3..=5 went straight to segments continues at 6.
        let small = record(&[(a, logged(1..=2))]);
        let after = record(&[(a, logged(6..=6))]);
        let log = CommitLog::recover([(0, small.clone()), (1, after)], |_| Ok(5)).unwrap();
        assert_eq!(seqs(&log, a), vec![6]);
        // ...but not past a gap after them.
        let late = record(&[(a, logged(8..=8))]);
        let error = CommitLog::recover([(0, small), (1, late)], |_| Ok(5)).unwrap_err();
        assert!(error.contains("commit record 1"), "{error}");
    }

    #[test]
    fn the_log_is_full_by_bytes_or_by_records() {
        let mut log = CommitLog::default();
        log.committed(
            [(
                RunId::new(),
                vec![Logged {
                    seq: 1,
                    bytes: vec![0; COMPACT_BYTES],
                }],
            )],
            1,
        );
        assert!(log.full());
        log.compacted();
        assert!(!log.full());
        log.committed([], COMPACT_RECORDS);
        assert!(log.full());
    }
}
