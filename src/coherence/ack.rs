//! The one acknowledgement path: what follows Redis's answer to a write.
//!
//! Read-your-writes and bounded staleness both hang on it: the written keys
//! are dropped from this instance's L1 a second time (a read that raced the
//! write may have filled the old value meanwhile — the generation check
//! rejects most such fills, this catches the rest), then published so every
//! peer drops them too. Every place that learns of an acknowledgement — a
//! reply slot answered, an orphaned slot whose client left, a relay whose
//! replies were counted — calls [`Ack::acknowledged`].

use std::sync::Arc;

use super::Bus;
use crate::cache::{Invalidation, L1};

/// Where acknowledged writes go: this instance's L1, then the bus.
#[derive(Debug, Clone, Default)]
pub struct Ack {
    l1: Option<Arc<L1>>,
    bus: Option<Arc<Bus>>,
}

impl Ack {
    /// Acknowledgements for `l1` and, over `bus`, every peer's.
    pub fn new(l1: Option<Arc<L1>>, bus: Option<Arc<Bus>>) -> Self {
        Self { l1, bus }
    }

    /// Redis has answered writes that touched `inv`: drop the keys again
    /// and publish them.
    pub fn acknowledged(&self, inv: &Invalidation, scratch: &mut Vec<u8>) {
        let Some(l1) = &self.l1 else { return };
        if inv.is_empty() {
            return;
        }
        inv.apply(l1, scratch);
        if let Some(bus) = &self.bus {
            bus.publish(inv);
        }
    }
}
