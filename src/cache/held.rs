//! How L1 holds a reply: as Redis sent it, or — at or above its rule's
//! `compress_min_size` — lz4-compressed (block format, `lz4_flex`), and
//! decompressed straight into the client's buffer on a hit.

use bytes::{Bytes, BytesMut};

/// A compressed reply is kept only if it is at most 7/8 of the original:
/// below that saving, decompressing on every hit costs more than the memory
/// is worth (and incompressible data — already compressed, random — stays
/// as it is).
pub fn compression_pays(packed: usize, raw: usize) -> bool {
    packed <= raw - raw / 8
}

/// `reply` compressed, when `min_size` asks for it and it pays.
pub(super) fn compress(reply: &[u8], min_size: Option<usize>) -> Option<Vec<u8>> {
    let min = min_size?;
    if reply.len() < min.max(1) || u32::try_from(reply.len()).is_err() {
        return None;
    }
    let packed = lz4_flex::block::compress(reply);
    compression_pays(packed.len(), reply.len()).then_some(packed)
}

/// A cached reply as L1 holds it, borrowed from its entry.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    bytes: &'a [u8],
    /// The decompressed length; 0 when `bytes` is the reply itself.
    raw_len: usize,
}

impl<'a> Held<'a> {
    /// A reply held as it is.
    pub(super) fn plain(bytes: &'a [u8]) -> Self {
        Self { bytes, raw_len: 0 }
    }

    /// A reply held compressed: `bytes` decompress to `raw_len` bytes.
    pub(super) fn compressed(bytes: &'a [u8], raw_len: usize) -> Self {
        Self { bytes, raw_len }
    }

    /// The bytes as stored.
    pub(super) fn stored(&self) -> &'a [u8] {
        self.bytes
    }

    /// The decompressed length if compressed (0 if not): the header's field.
    pub(super) fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// The reply's length as the client receives it.
    pub fn len(&self) -> usize {
        if self.raw_len == 0 {
            self.bytes.len()
        } else {
            self.raw_len
        }
    }

    /// Whether the reply is empty (no cached reply is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The reply, when held as it is (no copy).
    #[inline]
    pub fn as_plain(&self) -> Option<&'a [u8]> {
        (self.raw_len == 0).then_some(self.bytes)
    }

    /// Appends the reply to `out`; false (and `out` unchanged) if a
    /// compressed one does not decompress to its recorded length, which
    /// only a bug would cause: the caller then treats it as a miss.
    #[inline]
    pub fn append_to<B: ReplyBuf>(&self, out: &mut B) -> bool {
        match self.as_plain() {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                true
            }
            None => self.decompress_into(out),
        }
    }

    #[cold]
    fn decompress_into<B: ReplyBuf>(&self, out: &mut B) -> bool {
        let start = out.len();
        out.resize(start + self.raw_len, 0);
        match lz4_flex::block::decompress_into(self.bytes, &mut out.as_mut()[start..]) {
            Ok(n) if n == self.raw_len => true,
            _ => {
                out.truncate(start);
                false
            }
        }
    }

    /// The reply in a buffer of its own.
    pub fn to_bytes(&self) -> Option<Bytes> {
        if let Some(bytes) = self.as_plain() {
            return Some(Bytes::copy_from_slice(bytes));
        }
        let mut out = Vec::new();
        self.append_to(&mut out).then(|| out.into())
    }
}

/// Where a hit's reply is written: the outbox's `BytesMut`, MGET's `Vec`.
pub trait ReplyBuf: AsMut<[u8]> {
    /// Its length.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `bytes`.
    fn extend_from_slice(&mut self, bytes: &[u8]);
    /// Grows or shrinks it to `len`, filling with `value`.
    fn resize(&mut self, len: usize, value: u8);
    /// Shortens it to `len`.
    fn truncate(&mut self, len: usize);
}

impl ReplyBuf for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }
    fn resize(&mut self, len: usize, value: u8) {
        Vec::resize(self, len, value);
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }
}

impl ReplyBuf for BytesMut {
    fn len(&self) -> usize {
        BytesMut::len(self)
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        BytesMut::extend_from_slice(self, bytes);
    }
    fn resize(&mut self, len: usize, value: u8) {
        BytesMut::resize(self, len, value);
    }
    fn truncate(&mut self, len: usize) {
        BytesMut::truncate(self, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_replies_round_trip_and_others_stay_plain() {
        let json = br#"{"bids":[[100.5,2],[100.4,3]],"asks":[[100.6,1],[100.7,4]]}"#.repeat(40);
        let reply = [format!("${}\r\n", json.len()).as_bytes(), &json, b"\r\n"].concat();
        assert!(compress(&reply, None).is_none(), "off without a threshold");
        assert!(
            compress(&reply, Some(reply.len() + 1)).is_none(),
            "below it"
        );
        let packed = compress(&reply, Some(64)).expect("JSON compresses");
        assert!(
            packed.len() < reply.len() / 4,
            "{} of {}",
            packed.len(),
            reply.len()
        );
        let held = Held::compressed(&packed, reply.len());
        assert_eq!(held.len(), reply.len());
        let mut out = BytesMut::from(&b"+before\r\n"[..]);
        assert!(held.append_to(&mut out));
        assert_eq!(&out[..9], b"+before\r\n");
        assert_eq!(&out[9..], &reply[..]);
        assert_eq!(held.to_bytes().as_deref(), Some(&reply[..]));

        // Incompressible bytes (a xorshift stream) are not worth it.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&noise, Some(64)).is_none());
    }

    #[test]
    fn a_reply_that_does_not_decompress_leaves_the_buffer_as_it_was() {
        let mut out = vec![1, 2, 3];
        assert!(!Held::compressed(b"\xff\xff\xff", 100).append_to(&mut out));
        assert_eq!(out, [1, 2, 3]);
        let packed = compress(&[b'a'; 1000], Some(1)).expect("compresses");
        assert!(!Held::compressed(&packed, 999).append_to(&mut out));
        assert_eq!(out, [1, 2, 3]);
    }
}
