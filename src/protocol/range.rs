//! Single byte-range requests (RFC 9110 §14) for blobs.
//!
//! This module owns the interpretation of the `Range` request header and the `Content-Range`
//! values the proxy answers with. Only one range is served: a header with several ranges, an
//! unknown unit or bad syntax is ignored (the full body is sent with 200), which RFC 9110
//! §14.2 allows ("A server MAY ignore the Range header field").
//!
//! Parsing happens in two steps so a caller that does not know the blob size yet (a cold blob
//! being fetched) can keep the [`RangeSpec`] (or forward it upstream with its `Display`) and
//! [`RangeSpec::resolve`] it once the size is known.

use std::fmt;

/// The outcome of a `Range` header against a representation of known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// No (usable) range: send the whole body with 200.
    Full,
    /// Send bytes `start..=end` with 206; `end < size`.
    Partial { start: u64, end: u64 },
    /// Send 416 with `Content-Range: bytes */<size>`.
    Unsatisfiable,
}

impl ByteRange {
    /// The number of body bytes this range selects from a representation of `size` bytes.
    pub fn len(&self, size: u64) -> u64 {
        match *self {
            ByteRange::Full => size,
            ByteRange::Partial { start, end } => end - start + 1,
            ByteRange::Unsatisfiable => 0,
        }
    }

    /// True when no body bytes are selected.
    pub fn is_empty(&self, size: u64) -> bool {
        self.len(size) == 0
    }
}

/// One syntactically valid byte-range-spec, not yet resolved against a size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=<start>-<end>`, `start <= end`, `end` inclusive.
    FromTo { start: u64, end: u64 },
    /// `bytes=<start>-`
    From { start: u64 },
    /// `bytes=-<len>`: the last `len` bytes.
    Suffix { len: u64 },
}

impl RangeSpec {
    /// Resolves the spec against a representation of `size` bytes (RFC 9110 §14.1.1: the end
    /// is clamped to `size - 1`; a first position at or past the end, or a zero-length suffix,
    /// is unsatisfiable).
    pub fn resolve(self, size: u64) -> ByteRange {
        let last = match size.checked_sub(1) {
            Some(l) => l,
            None => return ByteRange::Unsatisfiable,
        };
        match self {
            RangeSpec::FromTo { start, .. } | RangeSpec::From { start } if start >= size => {
                ByteRange::Unsatisfiable
            }
            RangeSpec::FromTo { start, end } => ByteRange::Partial {
                start,
                end: end.min(last),
            },
            RangeSpec::From { start } => ByteRange::Partial { start, end: last },
            RangeSpec::Suffix { len: 0 } => ByteRange::Unsatisfiable,
            RangeSpec::Suffix { len } => ByteRange::Partial {
                start: size.saturating_sub(len),
                end: last,
            },
        }
    }
}

/// The `Range` header value for the spec, e.g. `bytes=100-`.
impl fmt::Display for RangeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeSpec::FromTo { start, end } => write!(f, "bytes={start}-{end}"),
            RangeSpec::From { start } => write!(f, "bytes={start}-"),
            RangeSpec::Suffix { len } => write!(f, "bytes=-{len}"),
        }
    }
}

/// Parses a `Range` header against a representation of `size` bytes.
pub(crate) fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    parse_range_unknown_size(header).map_or(ByteRange::Full, |spec| spec.resolve(size))
}

/// Parses a `Range` header without knowing the size: `None` when there is no header or it is
/// to be ignored (malformed, another unit, several ranges, `last < first`).
pub(crate) fn parse_range_unknown_size(header: Option<&str>) -> Option<RangeSpec> {
    let (unit, set) = header?.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    // A list: empty elements are allowed and skipped (RFC 9110 §5.6.1.2); only one real one.
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix {
            len: parse_pos(last)?,
        }),
        (false, true) => Some(RangeSpec::From {
            start: parse_pos(first)?,
        }),
        (false, false) => {
            let (start, end) = (parse_pos(first)?, parse_pos(last)?);
            (start <= end).then_some(RangeSpec::FromTo { start, end })
        }
    }
}

/// `1*DIGIT` that fits in a u64.
fn parse_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `Content-Range` of a 206: `bytes <start>-<end>/<size>`.
pub(crate) fn content_range(start: u64, end: u64, size: u64) -> String {
    format!("bytes {start}-{end}/{size}")
}

/// Parses the `Content-Range` of a 206 strictly: `bytes <start>-<end>/<size>` with
/// `start <= end < size`; `None` for anything else (`*` sizes, other units, bad numbers).
pub(crate) fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, size) = (parse_pos(start)?, parse_pos(end)?, parse_pos(size)?);
    (start <= end && end < size).then_some((start, end, size))
}

/// `Content-Range` of a 416: `bytes */<size>`.
pub(crate) fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(h: &str, size: u64) -> ByteRange {
        parse_range(Some(h), size)
    }

    fn partial(start: u64, end: u64) -> ByteRange {
        ByteRange::Partial { start, end }
    }

    #[test]
    fn no_header_is_full() {
        assert_eq!(parse_range(None, 10), ByteRange::Full);
        assert_eq!(parse_range_unknown_size(None), None);
    }

    #[test]
    fn closed_ranges() {
        assert_eq!(p("bytes=0-0", 10), partial(0, 0));
        assert_eq!(p("bytes=2-5", 10), partial(2, 5));
        assert_eq!(p("bytes=2-9", 10), partial(2, 9));
        // end clamped to size - 1
        assert_eq!(p("bytes=2-100", 10), partial(2, 9));
        assert_eq!(p("bytes=9-18446744073709551615", 10), partial(9, 9));
        assert_eq!(p("bytes=10-20", 10), ByteRange::Unsatisfiable);
    }

    #[test]
    fn open_and_suffix_ranges() {
        assert_eq!(p("bytes=3-", 10), partial(3, 9));
        assert_eq!(p("bytes=0-", 10), partial(0, 9));
        assert_eq!(p("bytes=10-", 10), ByteRange::Unsatisfiable);
        assert_eq!(p("bytes=11-", 10), ByteRange::Unsatisfiable);
        assert_eq!(p("bytes=-3", 10), partial(7, 9));
        assert_eq!(p("bytes=-10", 10), partial(0, 9));
        assert_eq!(p("bytes=-100", 10), partial(0, 9));
        assert_eq!(p("bytes=-0", 10), ByteRange::Unsatisfiable);
    }

    #[test]
    fn empty_representation() {
        for h in ["bytes=0-", "bytes=0-0", "bytes=-5", "bytes=-0"] {
            assert_eq!(p(h, 0), ByteRange::Unsatisfiable, "{h}");
        }
        assert_eq!(parse_range(None, 0), ByteRange::Full);
    }

    #[test]
    fn malformed_or_multiple_is_full() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=-+1",
            "bytes=0x1-2",
            "bytes=1 -2",
            "bytes=0-1,3-4",
            "bytes=0-1, -1",
            "items=0-1",
            "0-1",
            "bytes=18446744073709551616-",
            "bytes=-18446744073709551616",
        ] {
            assert_eq!(p(h, 10), ByteRange::Full, "{h:?}");
        }
    }

    #[test]
    fn lenient_spelling() {
        assert_eq!(p("Bytes=1-2", 10), partial(1, 2));
        assert_eq!(p("bytes= 1-2 ", 10), partial(1, 2));
        assert_eq!(p("bytes=1-2,", 10), partial(1, 2));
        assert_eq!(p("bytes=, 1-2", 10), partial(1, 2));
    }

    #[test]
    fn unknown_size_then_resolve() {
        let spec = parse_range_unknown_size(Some("bytes=100-")).unwrap();
        assert_eq!(spec, RangeSpec::From { start: 100 });
        assert_eq!(spec.to_string(), "bytes=100-");
        assert_eq!(spec.resolve(1000), partial(100, 999));
        assert_eq!(spec.resolve(100), ByteRange::Unsatisfiable);
        for h in ["bytes=1-2", "bytes=5-", "bytes=-7"] {
            let spec = parse_range_unknown_size(Some(h)).unwrap();
            assert_eq!(spec.to_string(), h);
            assert_eq!(
                parse_range_unknown_size(Some(&spec.to_string())),
                Some(spec)
            );
        }
        assert_eq!(parse_range_unknown_size(Some("bytes=0-1,2-3")), None);
    }

    #[test]
    fn lengths() {
        assert_eq!(partial(2, 5).len(10), 4);
        assert_eq!(ByteRange::Full.len(10), 10);
        assert!(ByteRange::Unsatisfiable.is_empty(10));
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(
            parse_content_range("bytes 999-999/1000"),
            Some((999, 999, 1000))
        );
        for bad in [
            "bytes 0-99/*",
            "bytes */1000",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-1/10",
            "bytes 0-1,3-4/10",
            "bytes -1-2/10",
            "bytes 0-1/10/2",
            "",
            "garbage",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn content_range_values() {
        assert_eq!(content_range(0, 99, 1000), "bytes 0-99/1000");
        assert_eq!(unsatisfied_content_range(1000), "bytes */1000");
    }
}
