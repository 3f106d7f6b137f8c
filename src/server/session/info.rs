//! `INFO`: Redis's reply with nearcache's `# Nearcache` section appended
//! when the sections asked for include it (see `admin::info` for which do),
//! `INFO nearcache` alone answered here without asking Redis.
//!
//! By mode: on the shared connections and pinned by `WATCH`, as above.
//! Inside `MULTI` it is forwarded unchanged: Redis queues it and answers it
//! in `EXEC`'s reply, without our section (splicing it into one element of
//! `EXEC`'s array is not worth the risk of a wrong splice). In a relay it is
//! relayed unchanged too: Redis answers it as it allows in that state (a
//! RESP3 subscriber gets its INFO, a RESP2 one Redis's refusal).

use super::{Request, Session};
use crate::admin::info::{self, Sections};

impl Session {
    /// `INFO [section …]` on the shared or pinned connection.
    pub(super) async fn info(&mut self, req: &Request<'_>) {
        match info::sections(&req.argv[1..]) {
            Sections::Ours => {
                let r = info::ours(&self.ctx, self.client.proto);
                self.answer(req, r).await;
            }
            Sections::Redis => self.forward(req).await,
            Sections::Both => {
                // Alone in its slot, so that its reply can be rewritten
                // there (as EXEC's is, for the commands queued locally). The
                // session waits for it, as for EXEC: INFO is rare.
                self.forward(req).await;
                self.flush_run().await;
                // (An INFO that could not be sent has an error reply in a
                // ready slot instead, which `last_replies` does not touch.)
                let Some(replies) = self.out.last_replies().await else {
                    return;
                };
                let proto = self.client.proto;
                let replies = replies.map(|redis| info::appended(&self.ctx, &redis, proto));
                self.out.answer_last(replies);
            }
        }
    }
}
