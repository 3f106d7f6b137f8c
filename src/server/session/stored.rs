//! The `store_compressed` phase of the request path (after admission):
//! values of such rules' keys are compressed on their way to Redis, reads
//! of them are marked to be decompressed, and commands on their raw bytes
//! are refused (see [`crate::stored`]).

use super::mode::Mode;
use super::{Request, Session};
use crate::error::ProxyError;
use crate::stored;

impl Session {
    /// Applies `store_compressed` to `req`; Err is its refusal.
    #[inline]
    pub(super) fn store_compressed(&mut self, req: &mut Request<'_>) -> Result<(), ProxyError> {
        let rules = &self.snapshot.rules;
        let Some(spec) = req.spec.filter(|_| rules.any_store_compressed()) else {
            return Ok(());
        };
        let plan = stored::plan(spec.name, &req.argv, rules).map_err(ProxyError::unsupported)?;
        // A relay's replies are passed on as Redis sends them, interleaved
        // with pushes: nearcache cannot pick the values out to decompress.
        if plan.decode.is_some() && matches!(self.mode, Mode::Relay(..)) {
            return Err(ProxyError::unsupported(format!(
                "ERR {} of a key stored compressed (store_compressed) is not supported while subscribed or tracking (CLIENT TRACKING); read it on another connection",
                spec.name.to_ascii_uppercase()
            )));
        }
        for (i, value) in plan.values {
            req.set_arg(i, value);
        }
        req.decode = plan.decode;
        Ok(())
    }
}
