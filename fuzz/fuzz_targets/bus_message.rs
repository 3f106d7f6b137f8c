//! Coherence bus messages, as they arrive from NATS: arbitrary bytes through
//! `Message::peek_sender` and `Message::decode`.
//!
//! Checked: no panic; what decodes re-encodes to the same message, and its
//! sender and send time are what `peek_sender` read.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nearcache::coherence::message::Message;

fuzz_target!(|data: &[u8]| {
    let peeked = Message::peek_sender(data).map(|(id, at)| (id.to_vec(), at));
    if let Ok(m) = Message::decode(Bytes::copy_from_slice(data)) {
        let (id, at) = peeked.expect("decodable message without a readable sender");
        assert_eq!(at, m.sent_at_us);
        assert_eq!(String::from_utf8_lossy(&id), m.instance);
        assert_eq!(Message::decode(m.encode()), Ok(m));
    }
});
