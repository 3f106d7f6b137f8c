//! Values Redis stores compressed: a rule's `store_compressed = true` has
//! string values written through nearcache compressed on their way to Redis,
//! and decompressed on every read through nearcache.
//!
//! **Format.** [`MAGIC`] (4 bytes: `00 4E 5A 01`, "\0NZ" and a version),
//! the value's length (u32, little-endian), then the value as one lz4 block
//! (`lz4_flex::block`). A value is stored so only if it is at least the
//! rule's `compress_min_size` and the block saves an eighth; a value that
//! happens to begin with the magic is always stored so, whatever its size,
//! so that reading it back cannot mistake it for a compressed one. Values
//! without the magic read unchanged: a rule can be switched on at any time.
//!
//! **Which commands.** Written: `SET` (and `SET … GET`), `SETNX`, `SETEX`,
//! `PSETEX`, `GETSET`, `MSET`, `MSETNX`. Read back decompressed: `GET`,
//! `MGET`, `GETEX`, `GETDEL`, `GETSET`, `SET … GET`, in every mode but a
//! relay (a subscribed or tracking client, refused) — L1 holds the
//! decompressed reply. Refused on such keys, since they would read or change
//! the compressed bytes: see [`RAW_BYTES`].

use bytes::{Bytes, BytesMut};

use crate::cache::{Rule, Rules};
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::upstream::Replies;

/// The first bytes of a value stored compressed.
pub const MAGIC: [u8; 4] = [0x00, b'N', b'Z', 0x01];

/// The magic and the length.
const HEADER: usize = MAGIC.len() + 4;

/// The largest value stored compressed, and so the most a stored value may
/// decompress to: larger values are stored as they are, and a forged header
/// claiming more is not believed (no allocation beyond this per value).
const MAX_VALUE: usize = 64 << 20;

/// Commands refused on a key whose rule stores values compressed: they read
/// or change a string's raw bytes, which are the compressed ones in Redis.
pub const RAW_BYTES: &[&str] = &[
    "append",
    "bitcount",
    "bitfield",
    "bitfield_ro",
    "bitop",
    "bitpos",
    "decr",
    "decrby",
    "getbit",
    "getrange",
    "incr",
    "incrby",
    "incrbyfloat",
    "lcs",
    "setbit",
    "setrange",
    "strlen",
    "substr",
];

/// `value` as Redis should store it under a rule with threshold `min_size`;
/// None to store it as it is.
pub fn encode(value: &[u8], min_size: usize) -> Option<Vec<u8>> {
    let ambiguous = value.starts_with(&MAGIC);
    if (value.len() < min_size && !ambiguous) || value.len() > MAX_VALUE {
        return None;
    }
    let len = u32::try_from(value.len()).ok()?;
    let packed = lz4_flex::block::compress(value);
    if !ambiguous && !crate::cache::compression_pays(packed.len(), value.len()) {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER + packed.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&packed);
    Some(out)
}

/// The value a stored one stands for, if it is compressed (and whole).
pub fn decode(stored: &[u8]) -> Option<Vec<u8>> {
    let rest = stored.strip_prefix(&MAGIC)?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let block = &rest[4..];
    // lz4 expands at most ~255 times: a larger claim is not one of ours.
    if len > MAX_VALUE || len > block.len().saturating_mul(255) {
        return None;
    }
    let mut out = vec![0; len];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == len => Some(out),
        _ => None,
    }
}

/// Which values of a reply are the rule's, to decompress: only those (a
/// value of another key that happens to look compressed is left alone).
#[derive(Debug, Clone, PartialEq)]
pub enum Decode {
    /// The reply is the value (`GET`, `GETEX`, `GETDEL`, `GETSET`,
    /// `SET … GET`).
    Value,
    /// The reply is an array of values (`MGET`): those marked.
    Elements(Box<[bool]>),
}

/// `replies` with their first reply decoded as `how` says (the rest, such
/// as a fill's `PTTL`, left as it is).
pub fn decode_replies(replies: Replies, how: &Decode) -> Replies {
    map_replies(replies, |frames| {
        let mut out = BytesMut::with_capacity(frames.len());
        let len = decode_into(frames, how, &mut out)?;
        out.extend_from_slice(&frames[len..]);
        Some(out.freeze())
    })
}

/// `EXEC`'s reply with its elements decoded as `each` says, by position
/// among the commands Redis queued.
pub fn decode_exec_replies(replies: Replies, each: &[(usize, Decode)]) -> Replies {
    map_replies(replies, |frames| {
        let mut out = BytesMut::with_capacity(frames.len());
        let n = array_header(frames, &mut out)?;
        let mut at = header_len(frames)?;
        for i in 0..n {
            let rest = frames.get(at..)?;
            at += match each.iter().find(|(j, _)| *j == i) {
                Some((_, how)) => decode_into(rest, how, &mut out)?,
                None => copy_frame(rest, &mut out)?,
            };
        }
        out.extend_from_slice(&frames[at..]);
        Some(out.freeze())
    })
}

/// `replies` with every top-level bulk string decoded: a warming batch of
/// the rule's `GET`s and their `PTTL`s.
pub fn decode_values(replies: Replies) -> Replies {
    map_replies(replies, |frames| {
        let mut out = BytesMut::with_capacity(frames.len());
        let mut at = 0;
        while at < frames.len() {
            at += decode_into(&frames[at..], &Decode::Value, &mut out)?;
        }
        Some(out.freeze())
    })
}

/// Applies `f` to the frames that arrived (a failure's partial ones too),
/// unless nothing in them looks compressed or `f` finds them not whole.
fn map_replies(replies: Replies, f: impl Fn(&[u8]) -> Option<Bytes>) -> Replies {
    let apply = |frames: &Bytes| {
        if frames.windows(MAGIC.len()).any(|w| w == MAGIC) {
            f(frames)
        } else {
            None
        }
    };
    match replies {
        Ok(frames) => Ok(apply(&frames).unwrap_or(frames)),
        Err(mut failed) => {
            if let Some(partial) = apply(&failed.partial) {
                failed.partial = partial;
            }
            Err(failed)
        }
    }
}

/// Copies the reply at the start of `buf` into `out`, decoded as `how`
/// says; returns its length in `buf`, None if it is not whole.
fn decode_into(buf: &[u8], how: &Decode, out: &mut BytesMut) -> Option<usize> {
    match (how, buf.first()?) {
        (Decode::Value, b'$') => bulk(buf, out),
        (Decode::Elements(mask), b'*') => {
            let n = array_header(buf, out)?;
            let mut at = header_len(buf)?;
            for i in 0..n {
                let rest = buf.get(at..)?;
                at += if mask.get(i) == Some(&true) {
                    decode_into(rest, &Decode::Value, out)?
                } else {
                    copy_frame(rest, out)?
                };
            }
            Some(at)
        }
        _ => copy_frame(buf, out),
    }
}

/// The length of the line `*n\r\n` (or `$n\r\n`) at the start of `buf`.
fn header_len(buf: &[u8]) -> Option<usize> {
    Some(buf.windows(2).position(|w| w == b"\r\n")? + 2)
}

/// Copies an array's header into `out`; its element count (0 for a null
/// array), None if `buf` does not start with one.
fn array_header(buf: &[u8], out: &mut BytesMut) -> Option<usize> {
    if buf.first() != Some(&b'*') {
        return None;
    }
    let len = header_len(buf)?;
    let n = parse_i64(&buf[1..len - 2])?;
    out.extend_from_slice(&buf[..len]);
    Some(usize::try_from(n).unwrap_or(0))
}

/// Copies one bulk string, decompressed if it is a stored value.
fn bulk(buf: &[u8], out: &mut BytesMut) -> Option<usize> {
    let start = header_len(buf)?;
    let Ok(len) = usize::try_from(parse_i64(&buf[1..start - 2])?) else {
        // A null bulk string.
        out.extend_from_slice(&buf[..start]);
        return Some(start);
    };
    let data = buf.get(start..start + len)?;
    let total = start + len + 2;
    if buf.len() < total {
        return None;
    }
    match decode(data) {
        Some(value) => {
            out.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(&buf[..total]),
    }
    Some(total)
}

/// Copies one reply of any kind.
fn copy_frame(buf: &[u8], out: &mut BytesMut) -> Option<usize> {
    let len = ReplyScanner::new().scan(buf).ok()??;
    out.extend_from_slice(&buf[..len]);
    Some(len)
}

/// What `store_compressed` does to one command.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Arguments to send compressed instead: (position, stored form).
    pub values: Vec<(usize, Bytes)>,
    /// Which values of its reply to decompress.
    pub decode: Option<Decode>,
}

/// The plan for command `name` (as the command table names it) with
/// arguments `argv` under `rules`; Err is the refusal of a raw-byte command
/// on a key stored compressed.
pub fn plan(name: &str, argv: &[Bytes], rules: &Rules) -> Result<Plan, String> {
    let rule = |key: &Bytes| rules.lookup(key).filter(|r| stores_compressed(r));
    let mut plan = Plan::default();
    let value_at = |plan: &mut Plan, key: usize, value: usize| {
        if let (Some(k), Some(v)) = (argv.get(key), argv.get(value)) {
            if let Some(min) = rule(k).and_then(|r| r.compress_min_size) {
                if let Some(stored) = encode(v, min) {
                    plan.values.push((value, stored.into()));
                }
            }
        }
    };
    match name {
        "set" => {
            value_at(&mut plan, 1, 2);
            let get = argv.iter().skip(3).any(|a| a.eq_ignore_ascii_case(b"get"));
            if get && argv.get(1).is_some_and(|k| rule(k).is_some()) {
                plan.decode = Some(Decode::Value);
            }
        }
        "setnx" => value_at(&mut plan, 1, 2),
        "getset" => {
            value_at(&mut plan, 1, 2);
            if argv.get(1).is_some_and(|k| rule(k).is_some()) {
                plan.decode = Some(Decode::Value);
            }
        }
        "setex" | "psetex" => value_at(&mut plan, 1, 3),
        "mset" | "msetnx" => {
            for key in (1..argv.len()).step_by(2) {
                value_at(&mut plan, key, key + 1);
            }
        }
        "get" | "getex" | "getdel" if argv.get(1).is_some_and(|k| rule(k).is_some()) => {
            plan.decode = Some(Decode::Value);
        }
        "mget" => {
            let mask: Box<[bool]> = argv.iter().skip(1).map(|k| rule(k).is_some()).collect();
            if mask.contains(&true) {
                plan.decode = Some(Decode::Elements(mask));
            }
        }
        // Stored bytes moved to a key read without decompressing (or the
        // other way round) would read as bytes no one wrote.
        "copy" | "rename" | "renamenx" => {
            if let (Some(from), Some(to)) = (argv.get(1), argv.get(2)) {
                if rule(from).is_some() != rule(to).is_some() {
                    return Err(format!(
                        "ERR {} from '{}' to '{}' is refused: exactly one of them has a rule with store_compressed = true, so the value would read as compressed bytes (or be decompressed) there",
                        name.to_ascii_uppercase(),
                        String::from_utf8_lossy(from),
                        String::from_utf8_lossy(to),
                    ));
                }
            }
        }
        raw if RAW_BYTES.contains(&raw) => {
            let keys = match raw {
                "bitop" => argv.get(2..).unwrap_or_default(),
                "lcs" => argv.get(1..3).unwrap_or_default(),
                _ => argv.get(1..2).unwrap_or_default(),
            };
            if let Some((key, r)) = keys.iter().find_map(|k| Some((k, rule(k)?))) {
                let (kind, selector) = r.selector();
                return Err(format!(
                    "ERR {} is refused on '{}': its rule ({kind} \"{}\") has store_compressed = true, so Redis holds compressed bytes; read it with GET and write it with SET",
                    name.to_ascii_uppercase(),
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(selector),
                ));
            }
        }
        _ => {}
    }
    Ok(plan)
}

/// Whether `rule` has Redis store its values compressed.
#[inline]
pub fn stores_compressed(rule: &Rule) -> bool {
    rule.store_compressed && rule.compress_min_size.is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, RuleConfig};
    use crate::stats::Stats;

    fn rules() -> Rules {
        Rules::new(
            &[
                RuleConfig {
                    store_compressed: true,
                    compress_min_size: Some(ByteSize(64)),
                    ..RuleConfig::caching("book:", std::time::Duration::from_secs(1))
                },
                RuleConfig::caching("tick:", std::time::Duration::from_secs(1)),
            ],
            &Stats::default(),
        )
    }

    fn argv(args: &[&[u8]]) -> Vec<Bytes> {
        args.iter().map(|a| Bytes::copy_from_slice(a)).collect()
    }

    const JSON: &[u8] = br#"{"bids":[["64250.10","0.5"],["64250.00","1.2"],["64249.90","0.7"]],"asks":[["64250.20","0.3"],["64250.30","2.0"]]}"#;

    fn resp_bulk(v: &[u8]) -> Vec<u8> {
        [format!("${}\r\n", v.len()).as_bytes(), v, b"\r\n"].concat()
    }

    #[test]
    fn values_round_trip_and_small_or_incompressible_ones_stay_raw() {
        let big = JSON.repeat(4);
        let stored = encode(&big, 64).expect("compressible");
        assert!(stored.starts_with(&MAGIC) && stored.len() < big.len() / 2);
        assert_eq!(decode(&stored).as_deref(), Some(&big[..]));
        assert_eq!(encode(b"small", 64), None);
        assert_eq!(decode(b"plain value"), None);
        // A value that looks like a stored one is wrapped, whatever its size.
        let lookalike = [&MAGIC[..], b"\x05\0\0\0junk"].concat();
        let wrapped = encode(&lookalike, 1 << 20).expect("always wrapped");
        assert_eq!(decode(&wrapped).as_deref(), Some(&lookalike[..]));
        assert_eq!(decode(&lookalike), None, "not a whole block");
        // A forged length is not believed.
        let forged = [&MAGIC[..], &u32::MAX.to_le_bytes(), b"\x10a"].concat();
        assert_eq!(decode(&forged), None);
    }

    #[test]
    fn only_the_values_named_are_decoded() {
        let big = JSON.repeat(4);
        let stored = encode(&big, 64).unwrap();
        let get = resp_bulk(&stored);
        let ok = |r: Replies| r.unwrap().to_vec();
        assert_eq!(
            ok(decode_replies(Ok(get.clone().into()), &Decode::Value)),
            resp_bulk(&big)
        );
        // GET's reply then PTTL's, as a miss fetches them.
        let pair = [&get[..], b":-1\r\n"].concat();
        assert_eq!(
            ok(decode_replies(Ok(pair.into()), &Decode::Value)),
            [&resp_bulk(&big)[..], b":-1\r\n"].concat()
        );
        // MGET: only the marked elements, though the last looks compressed too.
        let mget = [&b"*4\r\n"[..], &get, b"$-1\r\n", &resp_bulk(b"raw"), &get].concat();
        let mask: Box<[bool]> = [true, true, true, false].into();
        assert_eq!(
            ok(decode_replies(Ok(mget.into()), &Decode::Elements(mask))),
            [
                &b"*4\r\n"[..],
                &resp_bulk(&big),
                b"$-1\r\n",
                &resp_bulk(b"raw"),
                &get
            ]
            .concat()
        );
        // EXEC: by position; an unnamed GET and an HGETALL stay as they are.
        let hash = [&b"*2\r\n$1\r\nf\r\n"[..], &get].concat();
        let exec = [&b"*5\r\n+OK\r\n"[..], &get, &get, &hash, b"*1\r\n", &get].concat();
        let each = [(1, Decode::Value), (4, Decode::Elements([true].into()))];
        assert_eq!(
            ok(decode_exec_replies(Ok(exec.into()), &each)),
            [
                &b"*5\r\n+OK\r\n"[..],
                &resp_bulk(&big),
                &get,
                &hash,
                b"*1\r\n",
                &resp_bulk(&big)
            ]
            .concat()
        );
        // A warming batch: every GET's value, PTTLs untouched.
        let batch = [&get[..], b":-1\r\n", &resp_bulk(b"raw"), b":5\r\n"].concat();
        assert_eq!(
            ok(decode_values(Ok(batch.into()))),
            [
                &resp_bulk(&big)[..],
                b":-1\r\n",
                &resp_bulk(b"raw"),
                b":5\r\n"
            ]
            .concat()
        );
        // Nothing compressed, or not whole: unchanged.
        let plain = Bytes::from(resp_bulk(b"hello"));
        assert_eq!(
            decode_replies(Ok(plain.clone()), &Decode::Value).unwrap(),
            plain
        );
        let cut = Bytes::from(get[..get.len() - 3].to_vec());
        assert_eq!(
            decode_replies(Ok(cut.clone()), &Decode::Value).unwrap(),
            cut
        );
    }

    #[test]
    fn writes_are_compressed_reads_decoded_and_raw_byte_commands_refused() {
        let rules = rules();
        let big = JSON.repeat(4);
        let p = plan(
            "set",
            &argv(&[b"SET", b"book:1", &big, b"PX", b"100"]),
            &rules,
        )
        .unwrap();
        assert_eq!(p.values.len(), 1);
        assert_eq!(p.values[0].0, 2);
        assert_eq!(decode(&p.values[0].1).as_deref(), Some(&big[..]));
        assert_eq!(p.decode, None);
        let decode = |args: &[&[u8]]| {
            plan(
                &String::from_utf8_lossy(args[0]).to_lowercase(),
                &argv(args),
                &rules,
            )
            .unwrap()
            .decode
        };
        assert_eq!(
            decode(&[b"SET", b"book:1", &big, b"GET"]),
            Some(Decode::Value)
        );
        let p = plan(
            "mset",
            &argv(&[b"MSET", b"tick:1", &big, b"book:2", &big]),
            &rules,
        )
        .unwrap();
        assert_eq!(p.values.iter().map(|v| v.0).collect::<Vec<_>>(), [4]);
        assert_eq!(
            plan("setex", &argv(&[b"SETEX", b"book:1", b"5", &big]), &rules)
                .unwrap()
                .values[0]
                .0,
            3
        );
        assert_eq!(decode(&[b"GET", b"book:1"]), Some(Decode::Value));
        assert_eq!(decode(&[b"GET", b"tick:1"]), None);
        assert_eq!(
            decode(&[b"MGET", b"tick:1", b"book:1"]),
            Some(Decode::Elements([false, true].into()))
        );
        assert_eq!(decode(&[b"MGET", b"tick:1", b"tick:2"]), None);
        let e = plan("copy", &argv(&[b"COPY", b"book:1", b"tick:1"]), &rules).unwrap_err();
        assert!(
            e.starts_with("ERR COPY from 'book:1' to 'tick:1' is refused"),
            "{e}"
        );
        assert!(plan("rename", &argv(&[b"RENAME", b"tick:1", b"book:9"]), &rules).is_err());
        assert!(plan("rename", &argv(&[b"RENAME", b"book:1", b"book:9"]), &rules).is_ok());
        assert_eq!(
            plan("set", &argv(&[b"SET", b"tick:1", &big]), &rules),
            Ok(Plan::default())
        );
        let e = plan("append", &argv(&[b"APPEND", b"book:1", b"x"]), &rules).unwrap_err();
        assert!(
            e.starts_with("ERR APPEND is refused on 'book:1'") && e.contains("prefix \"book:\""),
            "{e}"
        );
        assert!(
            plan(
                "bitop",
                &argv(&[b"BITOP", b"AND", b"tick:d", b"book:1"]),
                &rules
            )
            .is_err()
        );
        assert!(plan("strlen", &argv(&[b"STRLEN", b"tick:1"]), &rules).is_ok());
    }
}
