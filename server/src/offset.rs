//! Offsets as the protocol's clients see them: fixed-width decimal in two
//! groups of 16 digits (`0000000000000000_0000000000000042`), the form the
//! protocol's reference servers use, so that comparing two of them as
//! strings orders them as positions and a client's literal zero offset is
//! ours too.
//!
//! Position `n` of a stream is "after its n-th stored event". A stream's own
//! run numbers its events from 1 (its `RunStarted`), so position 0 is the
//! empty stream; a fork starts at its fork point, and its run's event `seq`
//! sits at `base + seq - 1`.

use std::fmt;

/// Digits in each of an offset's two groups.
const GROUP: usize = 16;

/// Where a read starts, as the `offset` query parameter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFrom {
    /// `-1`, or no offset: the stream's beginning.
    Start,
    /// `now`: the stream's tail when the request arrives.
    Now,
    /// An offset this server handed out.
    After(u64),
}

/// An offset that is not `-1`, `now` or one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadOffset(pub(crate) String);

impl fmt::Display for BadOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(64).collect();
        write!(
            f,
            "malformed offset {shown:?}: expected -1, now, or {GROUP} digits, `_`, {GROUP} digits"
        )
    }
}

/// Reads an `offset` query value.
pub(crate) fn parse(raw: &str) -> Result<ReadFrom, BadOffset> {
    match raw {
        "-1" => Ok(ReadFrom::Start),
        "now" => Ok(ReadFrom::Now),
        _ => parse_position(raw)
            .map(ReadFrom::After)
            .ok_or_else(|| BadOffset(raw.to_owned())),
    }
}

/// A position in our own format, or `None`.
pub(crate) fn parse_position(raw: &str) -> Option<u64> {
    let (high, low) = raw.split_once('_')?;
    let digits = |g: &str| g.len() == GROUP && g.bytes().all(|b| b.is_ascii_digit());
    if !digits(high) || !digits(low) {
        return None;
    }
    let value: u128 = format!("{high}{low}").parse().ok()?;
    u64::try_from(value).ok()
}

/// The offset of position `n`.
pub(crate) fn format(n: u64) -> String {
    let digits = format!("{n:0width$}", width = 2 * GROUP);
    format!("{}_{}", &digits[..GROUP], &digits[GROUP..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_their_positions() {
        let positions = [0, 1, 9, 10, 99, 100, 12_345, u64::MAX];
        let texts: Vec<String> = positions.iter().map(|&n| format(n)).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted);
        for (&n, text) in positions.iter().zip(&texts) {
            assert_eq!(parse(text), Ok(ReadFrom::After(n)));
        }
    }

    #[test]
    fn sentinels_and_hostile_values() {
        assert_eq!(parse("-1"), Ok(ReadFrom::Start));
        assert_eq!(parse("now"), Ok(ReadFrom::Now));
        assert_eq!(
            parse("0000000000000000_0000000000000000"),
            Ok(ReadFrom::After(0))
        );
        for bad in [
            "",
            "0,1",
            "0 1",
            "1",
            "-2",
            "abc",
            "00000000000000000000",
            "9999999999999999_9999999999999999",
            "0000000000000000_000000000000000x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let long = "7".repeat(10_000);
        assert!(parse(&long).unwrap_err().to_string().len() < 200);
    }
}
