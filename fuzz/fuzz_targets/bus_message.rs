//! Coherence bus messages, as they arrive from NATS: arbitrary bytes through
//! `Message::peek_sender` and `Message::decode`.
//!
//! Checked: no panic; a decoded message's sender and send time are what
//! `peek_sender` read, and one with a UTF-8 sender re-encodes to itself, in
//! exactly the bytes `Message::overhead` + `Message::entry_size` predict.

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
        // Ids are Strings: a non-UTF-8 id is read lossily (U+FFFD), and need
        // not survive a round trip byte for byte.
        if std::str::from_utf8(&id).is_ok() {
            let wire = m.encode();
            // The publisher sizes messages to NATS's max_payload with these.
            let sized = Message::overhead(&m.instance)
                + m.entries
                    .iter()
                    .map(|(_, k)| Message::entry_size(k))
                    .sum::<usize>();
            assert_eq!(wire.len(), sized);
            assert_eq!(Message::decode(wire), Ok(m));
        }
    }
});
