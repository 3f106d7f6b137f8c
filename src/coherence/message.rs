//! The wire format of one invalidation message (version 1).
//!
//! Compact and self-describing, so a peer running another version can tell it
//! cannot read a message (and flushes its L1 rather than guess):
//!
//! ```text
//! "NC" | version u8 = 1 | kind u8 | id_len u8 | instance id | seq u64 BE
//!      | sent_at_us u64 BE (Unix time) | count u32 BE | count × (db u32 BE | len u32 BE | key)
//! kind: 1 = keys, 2 = flush everything, 3 = resync (no entries; only the
//! sequence number matters), 4 = pattern (one entry: db u32::MAX, the glob),
//! 5 = leave (no entries: the sender shut down cleanly, after everything it
//! published), 6 = keys in every database (entries' db is u32::MAX: a
//! script's keys, since a script may SELECT another database)
//! ```
//!
//! A build that predates a kind cannot read it, and flushes; it still reads
//! the header (`DecodeError::NewerKind`), so the sender's sequence moves on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The version this build writes and reads.
pub const VERSION: u8 = 1;

/// What a message asks peers to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Drop these keys.
    Keys = 1,
    /// Drop everything.
    Flush = 2,
    /// Nothing to drop; carries the sender's sequence so gaps show.
    Resync = 3,
    /// Drop keys matching a glob.
    Pattern = 4,
    /// The sender is shutting down cleanly: nothing follows, and its silence
    /// from now on is no reason to flush.
    Leave = 5,
    /// Drop these keys in every database (a script's keys: it may have
    /// selected another database before writing them).
    AnyDbKeys = 6,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What to do.
    pub kind: Kind,
    /// The sending instance.
    pub instance: String,
    /// The sender's sequence number (1, 2, 3… per process).
    pub seq: u64,
    /// When it was sent, µs since the Unix epoch.
    pub sent_at_us: u64,
    /// (db, key) pairs, or (u32::MAX, glob) for a pattern.
    pub entries: Vec<(u32, Bytes)>,
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a nearcache message at all.
    #[error("not a nearcache invalidation message")]
    NotOurs,
    /// A version this build does not know.
    #[error("message version {0}, this build reads version {VERSION}")]
    Version(u8),
    /// Truncated or inconsistent.
    #[error("malformed message")]
    Malformed,
    /// A kind from a later build: its entries cannot be read, but its
    /// header can, so the sender's sequence moves on without a gap.
    #[error("message kind {kind} from {instance}, newer than this build")]
    NewerKind {
        /// The kind byte.
        kind: u8,
        /// The sending instance.
        instance: String,
        /// Its sequence number.
        seq: u64,
    },
}

impl Message {
    /// Encoded size of a message from `instance` without its entries.
    pub fn overhead(instance: &str) -> usize {
        // "NC", version, kind, id_len, id, seq, sent_at_us, count.
        2 + 1 + 1 + 1 + instance.len().min(255) + 8 + 8 + 4
    }

    /// Encoded size of one entry with this key (or glob).
    pub fn entry_size(key: &[u8]) -> usize {
        4 + 4 + key.len()
    }

    /// Encodes the message.
    pub fn encode(&self) -> Bytes {
        let size = Self::overhead(&self.instance)
            + self
                .entries
                .iter()
                .map(|(_, k)| Self::entry_size(k))
                .sum::<usize>();
        let mut b = BytesMut::with_capacity(size);
        b.put_slice(b"NC");
        b.put_u8(VERSION);
        b.put_u8(self.kind as u8);
        let id = &self.instance.as_bytes()[..self.instance.len().min(255)];
        b.put_u8(id.len() as u8);
        b.put_slice(id);
        b.put_u64(self.seq);
        b.put_u64(self.sent_at_us);
        b.put_u32(u32::try_from(self.entries.len()).unwrap_or(u32::MAX));
        for (db, key) in &self.entries {
            b.put_u32(*db);
            b.put_u32(u32::try_from(key.len()).unwrap_or(u32::MAX));
            b.put_slice(key);
        }
        b.freeze()
    }

    /// The sender's id and send time, read without decoding the entries:
    /// enough to recognise one's own messages cheaply. `None` if the header
    /// is not one this build reads (`decode` then says why).
    pub fn peek_sender(buf: &[u8]) -> Option<(&[u8], u64)> {
        if buf.len() < 5 || &buf[..2] != b"NC" || buf[2] != VERSION {
            return None;
        }
        let id_end = 5 + buf[4] as usize;
        let sent_at = buf.get(id_end + 8..id_end + 16)?;
        Some((
            &buf[5..id_end],
            u64::from_be_bytes(sent_at.try_into().ok()?),
        ))
    }

    /// Decodes a message; never panics on any input.
    pub fn decode(mut buf: Bytes) -> Result<Message, DecodeError> {
        if buf.len() < 4 || &buf[..2] != b"NC" {
            return Err(DecodeError::NotOurs);
        }
        buf.advance(2);
        let version = buf.get_u8();
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind_byte = buf.get_u8();
        let kind = match kind_byte {
            1 => Some(Kind::Keys),
            2 => Some(Kind::Flush),
            3 => Some(Kind::Resync),
            4 => Some(Kind::Pattern),
            5 => Some(Kind::Leave),
            6 => Some(Kind::AnyDbKeys),
            _ => None,
        };
        let need = |buf: &Bytes, n: usize| {
            if buf.remaining() < n {
                Err(DecodeError::Malformed)
            } else {
                Ok(())
            }
        };
        need(&buf, 1)?;
        let id_len = buf.get_u8() as usize;
        need(&buf, id_len + 20)?;
        let instance = String::from_utf8_lossy(&buf.split_to(id_len)).into_owned();
        let seq = buf.get_u64();
        let Some(kind) = kind else {
            return Err(DecodeError::NewerKind {
                kind: kind_byte,
                instance,
                seq,
            });
        };
        let sent_at_us = buf.get_u64();
        let count = buf.get_u32() as usize;
        // Each entry is at least 8 bytes: a count beyond that is a lie.
        if count > buf.remaining() / 8 {
            return Err(DecodeError::Malformed);
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            need(&buf, 8)?;
            let db = buf.get_u32();
            let len = buf.get_u32() as usize;
            need(&buf, len)?;
            entries.push((db, buf.split_to(len)));
        }
        Ok(Message {
            kind,
            instance,
            seq,
            sent_at_us,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = Message {
            kind: Kind::Keys,
            instance: "host-42".into(),
            seq: 7,
            sent_at_us: 123,
            entries: vec![
                (0, Bytes::from_static(b"ticker:BTC")),
                (3, Bytes::from_static(b"\0bin\r\n")),
            ],
        };
        let wire = m.encode();
        assert_eq!(
            wire.len(),
            Message::overhead("host-42")
                + Message::entry_size(b"ticker:BTC")
                + Message::entry_size(b"\0bin\r\n"),
            "the publisher sizes messages with overhead + entry_size"
        );
        assert_eq!(Message::peek_sender(&wire), Some((&b"host-42"[..], 123)));
        assert_eq!(Message::decode(wire), Ok(m));
    }

    #[test]
    fn every_kind_round_trips_and_a_newer_kind_is_refused() {
        let kinds = [
            Kind::Keys,
            Kind::Flush,
            Kind::Resync,
            Kind::Pattern,
            Kind::Leave,
            Kind::AnyDbKeys,
        ];
        for kind in kinds {
            let m = Message {
                kind,
                instance: "i".into(),
                seq: 1,
                sent_at_us: 2,
                entries: vec![(u32::MAX, Bytes::from_static(b"k"))],
            };
            assert_eq!(Message::decode(m.encode()), Ok(m));
        }
        // A kind from a later build is unreadable (the receiver flushes),
        // never taken for one of ours.
        let mut wire = BytesMut::from(
            &Message {
                kind: Kind::Keys,
                instance: "i".into(),
                seq: 1,
                sent_at_us: 2,
                entries: vec![(0, Bytes::from_static(b"k"))],
            }
            .encode()[..],
        );
        wire[3] = kinds.len() as u8 + 1;
        assert_eq!(
            Message::decode(wire.freeze()),
            Err(DecodeError::NewerKind {
                kind: 7,
                instance: "i".into(),
                seq: 1
            })
        );
    }

    #[test]
    fn peek_sender_never_panics_on_truncation() {
        let wire = Message {
            kind: Kind::Resync,
            instance: "abc".into(),
            seq: 1,
            sent_at_us: 9,
            entries: vec![],
        }
        .encode();
        for n in 0..wire.len() {
            // Shorter than id + seq + sent_at: unreadable.
            assert_eq!(Message::peek_sender(&wire[..n]).is_some(), n >= 24, "{n}");
        }
    }

    #[test]
    fn other_versions_and_garbage_are_refused_not_misread() {
        let mut other = BytesMut::from(
            &Message {
                kind: Kind::Flush,
                instance: "x".into(),
                seq: 1,
                sent_at_us: 0,
                entries: vec![],
            }
            .encode()[..],
        );
        other[2] = 2;
        assert_eq!(
            Message::decode(other.freeze()),
            Err(DecodeError::Version(2))
        );
        assert_eq!(
            Message::decode(Bytes::from_static(b"hello")),
            Err(DecodeError::NotOurs)
        );
        assert_eq!(
            Message::decode(Bytes::from_static(b"NC\x01\x01\x05ab")),
            Err(DecodeError::Malformed)
        );
        let mut lying = BytesMut::from(&b"NC\x01\x01\x00"[..]);
        lying.put_u64(1);
        lying.put_u64(1);
        lying.put_u32(u32::MAX);
        assert_eq!(Message::decode(lying.freeze()), Err(DecodeError::Malformed));
    }
}
