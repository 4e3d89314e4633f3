//! Byte ranges: the `Range` request header on blob reads and `Content-Range` on chunked uploads.

/// An inclusive byte range `start..=end` already checked against a blob's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Outcome of interpreting a `Range` header against a blob of known size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole blob with 200 (RFC 9110 allows ignoring odd ranges).
    Full,
    /// Serve this part with 206.
    Partial(ByteRange),
    /// Nothing of the blob lies in the range: 416.
    Unsatisfiable,
}

/// Interpret `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` for a blob of `size` bytes.
/// Multi-range requests are served whole, as RFC 9110 permits.
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => RangeRequest::Full,
        (true, false) => match parse(b) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(ByteRange { start: size.saturating_sub(n), end: size - 1 }),
            None => RangeRequest::Full,
        },
        (false, open_end) => {
            let Some(start) = parse(a) else { return RangeRequest::Full };
            let end = if open_end {
                u64::MAX
            } else {
                match parse(b) {
                    Some(e) if e >= start => e,
                    _ => return RangeRequest::Full,
                }
            };
            if start >= size {
                return RangeRequest::Unsatisfiable;
            }
            RangeRequest::Partial(ByteRange { start, end: end.min(size - 1) })
        }
    }
}

/// Why a `Content-Range` header on an upload chunk cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Content-Range must be <start>-<end> with start <= end")]
pub struct ContentRangeError;

/// Parse an upload chunk's `Content-Range: <start>-<end>` (inclusive; a `bytes ` prefix and a
/// `/total` suffix are tolerated because some clients send the RFC 9110 form).
pub fn parse_content_range(header: &str) -> Result<ByteRange, ContentRangeError> {
    let s = header.trim();
    let s = s.strip_prefix("bytes").map(str::trim_start).unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or(ContentRangeError)?;
    let start: u64 = a.trim().parse().map_err(|_| ContentRangeError)?;
    let end: u64 = b.trim().parse().map_err(|_| ContentRangeError)?;
    // A range ending at the last u64 has a length past u64 (and no blob is that big).
    if end < start || end == u64::MAX {
        return Err(ContentRangeError);
    }
    Ok(ByteRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let p = |s, e| RangeRequest::Partial(ByteRange { start: s, end: e });
        assert_eq!(parse_range("bytes=0-9", 100), p(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), p(90, 99));
        assert_eq!(parse_range("bytes=90-200", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), p(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), p(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Full);
        assert_eq!(parse_range("bytes=x-1", 100), RangeRequest::Full);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Ok(ByteRange { start: 0, end: 99 }));
        assert_eq!(parse_content_range("bytes 100-199/*"), Ok(ByteRange { start: 100, end: 199 }));
        assert_eq!(parse_content_range("5-4"), Err(ContentRangeError));
        assert_eq!(parse_content_range("abc"), Err(ContentRangeError));
        assert_eq!(parse_content_range("-5"), Err(ContentRangeError));
        assert_eq!(parse_content_range("0-18446744073709551615"), Err(ContentRangeError));
        assert_eq!(parse_content_range("0-18446744073709551614").map(|r| r.len()), Ok(u64::MAX));
    }
}
