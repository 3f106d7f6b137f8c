//! One command on its way through the session: its arguments, where its
//! bytes are in the client's input, and what routing made of it.

use std::ops::Range;

use bytes::Bytes;

use super::route::{Route, route_spec};
use crate::acl::Renamed;
use crate::command::CommandSpec;
use crate::stats::Class;
use crate::upstream::encode_command;

/// A command of the current read.
pub struct Request<'c> {
    /// The read the command came in.
    chunk: &'c Bytes,
    /// Its frame in `chunk`; None for an inline command or one whose
    /// arguments nearcache changed, which are sent re-encoded.
    frame: Option<Range<usize>>,
    /// Bytes to send instead of the client's (a rewritten command).
    replaced: Option<Bytes>,
    /// Its arguments (`argv[0]` is the name; never empty).
    pub argv: Vec<Bytes>,
    /// What the proxy does with it.
    pub route: Route,
    /// Its entry in the command table (None for unknown commands).
    pub spec: Option<&'static CommandSpec>,
    /// What `server.rename` made of its name.
    pub renamed: Renamed,
    /// Values in its reply that Redis stores compressed, to decompress
    /// (`store_compressed`).
    pub decode: Option<crate::stored::Decode>,
}

impl<'c> Request<'c> {
    /// Classifies the command in `argv`, whose frame is `frame` of `chunk`.
    #[inline]
    pub fn new(chunk: &'c Bytes, frame: Option<Range<usize>>, argv: Vec<Bytes>) -> Self {
        let (route, spec) = route_spec(&argv);
        Self {
            chunk,
            frame,
            replaced: None,
            argv,
            route,
            spec,
            renamed: Renamed::No,
            decode: None,
        }
    }

    /// The read the command came in.
    #[inline]
    pub fn chunk(&self) -> &'c Bytes {
        self.chunk
    }

    /// Its frame in [`Request::chunk`], if it is sent as the client's bytes.
    #[inline]
    pub fn frame(&self) -> Option<Range<usize>> {
        self.frame.clone()
    }

    /// Its full name in the command table (`client|setname`), or "".
    #[inline]
    pub fn name(&self) -> &'static str {
        self.spec.map_or("", |s| s.name)
    }

    /// Its class, for counting.
    #[inline]
    pub fn class(&self) -> Class {
        if self.route == Route::Proxy {
            Class::Proxy
        } else {
            Class::of(self.spec)
        }
    }

    /// How many bytes go upstream for it.
    pub fn len(&self) -> usize {
        match (&self.replaced, &self.frame) {
            (None, Some(f)) => f.len(),
            _ => self.bytes().len(),
        }
    }

    /// The bytes to send upstream: the client's own, unless re-encoded.
    pub fn bytes(&self) -> Bytes {
        if let Some(bytes) = &self.replaced {
            return bytes.clone();
        }
        match &self.frame {
            Some(f) => self.chunk.slice(f.clone()),
            None => encode_command(&self.argv),
        }
    }

    /// The request as L1 keys its replies: the client's bytes, or an inline
    /// command's encoding (which `with` receives without a copy when it can).
    pub fn with_bytes<T>(&self, with: impl FnOnce(&[u8]) -> T) -> T {
        match (&self.replaced, &self.frame) {
            (None, Some(f)) => with(&self.chunk[f.clone()]),
            _ => with(&self.bytes()),
        }
    }

    /// Sets argument `i` (an id nearcache translates for Redis): the command
    /// is then sent re-encoded.
    pub fn set_arg(&mut self, i: usize, value: Bytes) {
        self.argv[i] = value;
        self.frame = None;
    }

    /// Sends `bytes` instead of the client's command (e.g. a `SET` with the
    /// rule's `upstream_ttl` added).
    pub fn replace(&mut self, bytes: Bytes) {
        self.replaced = Some(bytes);
        self.frame = None;
    }

    /// The arguments, for reuse by the next command.
    pub fn into_argv(self) -> Vec<Bytes> {
        self.argv
    }
}
