//! Upstream reply framing: `ReplyScanner::scan` over a stream of replies,
//! fed in growing reads, against redis-protocol's RESP3 decoder.
//!
//! Input layout: byte 0 is the largest read size (0 = all at once); the rest
//! is what upstream sends.
//!
//! Checked: no panic; a frame never ends past the buffer; scanning
//! incrementally finds the same frame (or the same error) as scanning the
//! whole buffer at once; and wherever both the scanner and
//! `redis_protocol::resp3::decode::complete::decode` accept the next frame,
//! they agree on its length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nearcache::protocol::ReplyScanner;
use redis_protocol::resp3::decode::complete::decode;

/// redis-protocol's decoder recurses once per nesting level (see
/// shared/PITFALLS.md), so inputs that could nest deeper than this are not
/// shown to it: that would crash the harness on a known limitation of the
/// reference, not find anything in nearcache.
const MAX_REFERENCE_NESTING: usize = 64;

fn could_nest_deeply(buf: &[u8]) -> bool {
    buf.iter()
        .filter(|b| matches!(b, b'*' | b'%' | b'~' | b'>' | b'|'))
        .count()
        > MAX_REFERENCE_NESTING
}

fuzz_target!(|data: &[u8]| {
    let [ctl, stream @ ..] = data else {
        return;
    };
    let step = usize::from(*ctl);
    let reference_ok = !could_nest_deeply(stream);

    let mut rest = stream;
    // Like an upstream connection: frame after frame from one buffer.
    for _ in 0..64 {
        if rest.is_empty() {
            break;
        }
        let whole = ReplyScanner::new().scan(rest);

        // The same frame arriving in reads of `step` bytes (one scanner,
        // resumed on a growing buffer).
        if step > 0 {
            let mut scanner = ReplyScanner::new();
            let mut seen = 0;
            let incremental = loop {
                seen = (seen + step).min(rest.len());
                match scanner.scan(&rest[..seen]) {
                    Ok(None) if seen < rest.len() => continue,
                    other => break other,
                }
            };
            assert_eq!(whole, incremental, "read size {step} changed the result");
        }

        let Ok(found) = whole else {
            return;
        };
        if let Some(n) = found {
            assert!(
                n > 0 && n <= rest.len(),
                "frame end {n} outside buffer of {}",
                rest.len()
            );
        }
        if reference_ok {
            if let Ok(reference) = decode(rest) {
                let reference = reference.map(|(_, len)| len);
                assert_eq!(
                    found,
                    reference,
                    "scanner and redis-protocol disagree on {:?}",
                    String::from_utf8_lossy(&rest[..rest.len().min(200)])
                );
            }
        }
        match found {
            Some(n) => rest = &rest[n..],
            None => return,
        }
    }
});
