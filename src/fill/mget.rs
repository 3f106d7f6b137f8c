//! MGET, served per key: cached keys from L1, the rest fetched (with their
//! PTTLs) in one pipeline, each cached on its own, and the reply stitched
//! back together in order.

use std::io::Write as _;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::{Fetch, FillPolicy, Flight, Upstream, bus_allows, integer};
use crate::cache::{FillToken, L1, Now, Rules, Viewer};
use crate::protocol::ReplyScanner;
use crate::protocol::parser::parse_i64;
use crate::stats::RuleStats;
use crate::stored::Decode;
use crate::upstream::connection::Failed;
use crate::upstream::{Replies, UpstreamError, encode_command};

/// The variant under which one key's element of an MGET reply is cached (not
/// a real request: MGET answers nil for non-strings where GET errors, so the
/// two must not share entries).
pub const MGET_ELEMENT: &[u8] = b"\0mget-element";

/// What L1 had of an MGET's keys.
pub struct Mget {
    /// Per key: where its cached element sits in the hits buffer.
    spans: Vec<Option<Range<usize>>>,
    /// Keys to fetch (argument index - 1), with what their fill needs if a
    /// rule caches them.
    missing: Vec<(usize, Option<(FillPolicy, FillToken)>)>,
    /// Hits due for a refresh-ahead.
    refresh: Vec<(usize, FillPolicy)>,
}

/// Looks up every key of `MGET keys…`, copying hits into `buf` after the
/// reply's header (when every key hits, `buf` is the whole reply). None when
/// no key has a caching rule: the command is forwarded as it is.
pub fn mget(
    l1: &L1,
    rules: &Rules,
    (db, viewer): (u32, Viewer),
    keys: &[Bytes],
    buf: &mut Vec<u8>,
) -> Option<Mget> {
    let now = Now::current();
    buf.clear();
    let _ = write!(buf, "*{}\r\n", keys.len());
    let mut m = Mget {
        spans: Vec::with_capacity(keys.len()),
        missing: Vec::new(),
        refresh: Vec::new(),
    };
    let mut any_rule = false;
    for (i, key) in keys.iter().enumerate() {
        let Some(rule) = rules.caching(key) else {
            m.spans.push(None);
            m.missing.push((i, None));
            continue;
        };
        any_rule = true;
        let start = buf.len();
        let hit = l1.get(db, key, viewer, MGET_ELEMENT, now, |e| e.append_to(buf));
        match hit {
            Some(due) => {
                RuleStats::inc(&rule.stats.hits);
                m.spans.push(Some(start..buf.len()));
                if due {
                    m.refresh.push((i, FillPolicy::of(rule)));
                }
            }
            None => {
                RuleStats::inc(&rule.stats.misses);
                m.spans.push(None);
                let token = l1.begin_fill(db, key);
                m.missing.push((i, Some((FillPolicy::of(rule), token))));
            }
        }
    }
    any_rule.then_some(m)
}

impl Mget {
    /// Every key was a hit: the hits buffer is the reply.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl<U: Upstream> Fetch<'_, U> {
    /// Fetches the keys `m` missed (`hits` holds the others' elements) and
    /// returns where the stitched reply arrives; `decode`: which of `keys`
    /// have values stored compressed (`store_compressed`).
    pub async fn mget_rest(
        &mut self,
        m: &mut Mget,
        keys: &[Bytes],
        hits: &[u8],
        decode: Option<&Decode>,
    ) -> oneshot::Receiver<Replies> {
        let cached = Bytes::copy_from_slice(hits);
        let parts: Vec<Option<Bytes>> = m
            .spans
            .drain(..)
            .map(|span| span.map(|r| cached.slice(r)))
            .collect();
        let missing = std::mem::take(&mut m.missing);
        // The mask of the keys fetched, out of the client's.
        let decode = decode.map(|how| match how {
            Decode::Elements(mask) => Decode::Elements(
                missing
                    .iter()
                    .map(|(i, _)| mask.get(*i).copied().unwrap_or(false))
                    .collect(),
            ),
            Decode::Value => Decode::Value,
        });
        let keys: Vec<Bytes> = keys.to_vec();
        // One pipeline: MGET of the missing keys, then PTTL of each that a
        // rule caches (the others are only passed through).
        let mut mget: Vec<&[u8]> = vec![b"MGET"];
        mget.extend(missing.iter().map(|(i, _)| &keys[*i][..]));
        let mut frames = BytesMut::from(&encode_command(&mget)[..]);
        let mut pttls = 0;
        for (i, fill) in &missing {
            if fill.is_some() {
                frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &keys[*i]]));
                pttls += 1;
            }
        }
        let count = u32::try_from(pttls + 1).unwrap_or(u32::MAX);
        let sent = self.upstream.request(frames.freeze(), count).await;
        let (client_tx, client_rx) = oneshot::channel();
        let (db, viewer, l1) = (self.db, self.viewer, self.l1.clone());
        let stale_allowed = missing
            .iter()
            .any(|(_, f)| f.as_ref().is_some_and(|(p, _)| p.stale_if_error.is_some()));
        let bus = self.bus.filter(|_| stale_allowed).cloned();
        tokio::spawn(async move {
            let mut replies = sent.replies().await;
            if let Some(how) = &decode {
                replies = crate::stored::decode_replies(replies, how);
            }
            let reply = match replies {
                Ok(frames) => match split(&frames, missing.len(), pttls) {
                    Some((elements, pttls)) => {
                        let mut pttls = pttls.iter();
                        for ((i, fill), element) in missing.iter().zip(&elements) {
                            if let Some((policy, token)) = fill {
                                let pttl = pttls.next().copied().flatten();
                                let at = (db, &keys[*i][..]);
                                policy.fill(&l1, *token, at, viewer, MGET_ELEMENT, element, pttl);
                            }
                        }
                        let fetched: Vec<(usize, &[u8])> = missing
                            .iter()
                            .map(|(i, _)| *i)
                            .zip(elements.iter().copied())
                            .collect();
                        Ok(stitch(&parts, &fetched))
                    }
                    // An error reply (or something unexpected): pass MGET's
                    // own first frame through, uncached.
                    None => match ReplyScanner::new().scan(&frames) {
                        Ok(Some(len)) => Ok(frames.slice(..len)),
                        _ => Err(Failed::nothing(UpstreamError::InvalidReply)),
                    },
                },
                // Redis unreachable: whole only if L1 still holds every
                // missing key within its rule's stale-if-error window.
                Err(failed) => {
                    let stale: Option<Vec<(usize, Bytes, &FillPolicy)>> = missing
                        .iter()
                        .map(|(i, fill)| {
                            let (policy, _) = fill.as_ref()?;
                            let at = (db, &keys[*i][..]);
                            let reply = policy.stale(
                                &l1,
                                at,
                                viewer,
                                MGET_ELEMENT,
                                &failed.error,
                                || bus_allows(bus.as_ref()),
                            )?;
                            Some((*i, reply, policy))
                        })
                        .collect();
                    match stale {
                        Some(elements) => {
                            for (_, _, policy) in &elements {
                                RuleStats::inc(&policy.stats.stale_hits);
                            }
                            let fetched: Vec<(usize, &[u8])> =
                                elements.iter().map(|(i, e, _)| (*i, &e[..])).collect();
                            Ok(stitch(&parts, &fetched))
                        }
                        None => Err(Failed::nothing(failed.error)),
                    }
                }
            };
            let _ = client_tx.send(reply);
        });
        client_rx
    }

    /// Refresh-ahead of the keys an MGET served from L1 that are due for it,
    /// after its reply is queued: `MGET key` and `PTTL key` each, in the
    /// background, unless a refresh of that key is already running.
    pub async fn mget_refresh(&mut self, m: Mget, keys: &[Bytes]) {
        for (i, policy) in m.refresh {
            let key = keys[i].clone();
            self.l1
                .flight_id(self.db, &key, self.viewer, MGET_ELEMENT, self.scratch);
            let Flight::Leader = self.flights.join(self.scratch) else {
                continue;
            };
            let flight = Bytes::copy_from_slice(self.scratch);
            let token = self.l1.begin_fill(self.db, &key);
            let mut frames = BytesMut::from(&encode_command(&[&b"MGET"[..], &key])[..]);
            frames.extend_from_slice(&encode_command(&[&b"PTTL"[..], &key]));
            let sent = self.upstream.request(frames.freeze(), 2).await;
            let (db, viewer) = (self.db, self.viewer);
            let (l1, flights) = (self.l1.clone(), self.flights.clone());
            tokio::spawn(async move {
                let mut replies = sent.replies().await;
                if policy.decode {
                    let one = Decode::Elements([true].into());
                    replies = crate::stored::decode_replies(replies, &one);
                }
                if let Ok(frames) = replies {
                    if let Some((elements, pttls)) = split(&frames, 1, 1) {
                        let (element, pttl) = (elements[0], pttls[0]);
                        policy.fill(&l1, token, (db, &key), viewer, MGET_ELEMENT, element, pttl);
                    }
                }
                // Only refreshes join this flight, and none of them waits.
                drop(flights.land(&flight));
            });
        }
    }
}

/// An MGET reply's elements and the PTTL of each key.
type MgetReplies<'a> = (Vec<&'a [u8]>, Vec<Option<i64>>);

/// Splits `*k` + k elements, then `p` PTTL integers; None unless it is
/// exactly that.
fn split(frames: &[u8], k: usize, p: usize) -> Option<MgetReplies<'_>> {
    let rest = frames.strip_prefix(b"*")?;
    let nl = rest.iter().position(|&b| b == b'\r')?;
    if parse_i64(&rest[..nl])? != i64::try_from(k).ok()? {
        return None;
    }
    let mut at = 1 + nl + 2;
    let mut elements = Vec::with_capacity(k);
    for _ in 0..k {
        let len = ReplyScanner::new().scan(frames.get(at..)?).ok()??;
        elements.push(&frames[at..at + len]);
        at += len;
    }
    let mut pttls = Vec::with_capacity(p);
    for _ in 0..p {
        let len = ReplyScanner::new().scan(frames.get(at..)?).ok()??;
        pttls.push(integer(Some(&frames[at..at + len])));
        at += len;
    }
    Some((elements, pttls))
}

/// An MGET reply from cached parts and fetched `(index, element)` pairs.
fn stitch(parts: &[Option<Bytes>], fetched: &[(usize, &[u8])]) -> Bytes {
    let mut out =
        BytesMut::with_capacity(16 + parts.iter().flatten().map(|p| p.len()).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    let mut fetched = fetched.iter().peekable();
    for (i, part) in parts.iter().enumerate() {
        match part {
            Some(bytes) => out.extend_from_slice(bytes),
            None => {
                if let Some((_, element)) = fetched.next_if(|(j, _)| *j == i) {
                    out.extend_from_slice(element);
                }
            }
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mget_replies_split_and_stitch_in_order() {
        let frames = b"*2\r\n$1\r\na\r\n$-1\r\n:-1\r\n:-2\r\n";
        let (elements, pttls) = split(frames, 2, 2).expect("well formed");
        assert_eq!(elements, vec![&b"$1\r\na\r\n"[..], &b"$-1\r\n"[..]]);
        assert_eq!(pttls, vec![Some(-1), Some(-2)]);
        assert!(split(b"-ERR x\r\n", 2, 2).is_none());
        // Fewer PTTLs than elements (keys no rule caches get none).
        let (elements, pttls) =
            split(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n:-1\r\n", 2, 1).expect("well formed");
        assert_eq!((elements.len(), pttls), (2, vec![Some(-1)]));
        let parts = [None, Some(Bytes::from_static(b"$1\r\nb\r\n")), None];
        let out = stitch(&parts, &[(0, &b"$1\r\na\r\n"[..]), (2, &b"$-1\r\n"[..])]);
        assert_eq!(&out[..], b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n");
    }
}
