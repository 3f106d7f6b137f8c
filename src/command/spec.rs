//! The shape of one command's metadata, as Redis 7 reports it in `COMMAND INFO`.
//!
//! The table in `table.rs` is generated from a real redis-server by
//! `scripts/gen-command-table.py`; these types are what it is generated into.

/// Command flags: Redis's own command flags plus the ACL categories nearcache
/// routes on. One bit each; a command's `flags` is the union.
pub mod flag {
    /// May modify the keyspace (`write`).
    pub const WRITE: u32 = 1 << 0;
    /// Never modifies the keyspace (`readonly`).
    pub const READONLY: u32 = 1 << 1;
    /// May grow memory use (`denyoom`).
    pub const DENYOOM: u32 = 1 << 2;
    /// Administrative (`admin`).
    pub const ADMIN: u32 = 1 << 3;
    /// Pub/Sub related (`pubsub`).
    pub const PUBSUB: u32 = 1 << 4;
    /// Not allowed in scripts (`noscript`).
    pub const NOSCRIPT: u32 = 1 << 5;
    /// May block the connection (`blocking`).
    pub const BLOCKING: u32 = 1 << 6;
    /// Allowed while the dataset loads (`loading`).
    pub const LOADING: u32 = 1 << 7;
    /// Allowed on a stale replica (`stale`).
    pub const STALE: u32 = 1 << 8;
    /// O(1) or O(log N) (`fast`).
    pub const FAST: u32 = 1 << 9;
    /// Allowed before authentication (`no_auth`).
    pub const NO_AUTH: u32 = 1 << 10;
    /// May replicate even when read-only (`may_replicate`).
    pub const MAY_REPLICATE: u32 = 1 << 11;
    /// Keys cannot be found from fixed positions (`movablekeys`).
    pub const MOVABLE_KEYS: u32 = 1 << 12;
    /// Not allowed inside MULTI (`no_multi`).
    pub const NO_MULTI: u32 = 1 << 13;
    /// Allowed while a script is busy (`allow_busy`).
    pub const ALLOW_BUSY: u32 = 1 << 14;
    /// Key arguments are optional (`no_mandatory_keys`).
    pub const NO_MANDATORY_KEYS: u32 = 1 << 15;
    /// ACL category `@transaction` (MULTI, EXEC, DISCARD, WATCH, UNWATCH).
    pub const TRANSACTION: u32 = 1 << 16;
    /// ACL category `@connection` (connection state: SELECT, HELLO, CLIENT …).
    pub const CONNECTION: u32 = 1 << 17;
    /// ACL category `@scripting` (EVAL, FCALL, SCRIPT, FUNCTION …).
    pub const SCRIPTING: u32 = 1 << 18;
    /// The command has no key specs at all.
    pub const NO_KEYS: u32 = 1 << 19;
    /// nearcache's own: a read-only command on one key whose reply depends
    /// only on the key's value, so L1 may cache it until the key is written
    /// or expires (`TTL`/`PTTL` are not: their answers change with time).
    /// Listed in `scripts/gen-command-table.py`.
    pub const CACHEABLE: u32 = 1 << 20;
}

/// Redis's ACL categories (`ACL CAT`), one bit each; a command's `acl` is the
/// union of the categories `COMMAND INFO` gives it.
pub mod acl {
    /// `@keyspace`.
    pub const KEYSPACE: u32 = 1 << 0;
    /// `@read`.
    pub const READ: u32 = 1 << 1;
    /// `@write`.
    pub const WRITE: u32 = 1 << 2;
    /// `@set`.
    pub const SET: u32 = 1 << 3;
    /// `@sortedset`.
    pub const SORTEDSET: u32 = 1 << 4;
    /// `@list`.
    pub const LIST: u32 = 1 << 5;
    /// `@hash`.
    pub const HASH: u32 = 1 << 6;
    /// `@string`.
    pub const STRING: u32 = 1 << 7;
    /// `@bitmap`.
    pub const BITMAP: u32 = 1 << 8;
    /// `@hyperloglog`.
    pub const HYPERLOGLOG: u32 = 1 << 9;
    /// `@geo`.
    pub const GEO: u32 = 1 << 10;
    /// `@stream`.
    pub const STREAM: u32 = 1 << 11;
    /// `@pubsub`.
    pub const PUBSUB: u32 = 1 << 12;
    /// `@admin`.
    pub const ADMIN: u32 = 1 << 13;
    /// `@fast`.
    pub const FAST: u32 = 1 << 14;
    /// `@slow`.
    pub const SLOW: u32 = 1 << 15;
    /// `@blocking`.
    pub const BLOCKING: u32 = 1 << 16;
    /// `@dangerous`.
    pub const DANGEROUS: u32 = 1 << 17;
    /// `@connection`.
    pub const CONNECTION: u32 = 1 << 18;
    /// `@transaction`.
    pub const TRANSACTION: u32 = 1 << 19;
    /// `@scripting`.
    pub const SCRIPTING: u32 = 1 << 20;

    /// Every category's name and bit, in `ACL CAT`'s order.
    pub const ALL: &[(&str, u32)] = &[
        ("keyspace", KEYSPACE),
        ("read", READ),
        ("write", WRITE),
        ("set", SET),
        ("sortedset", SORTEDSET),
        ("list", LIST),
        ("hash", HASH),
        ("string", STRING),
        ("bitmap", BITMAP),
        ("hyperloglog", HYPERLOGLOG),
        ("geo", GEO),
        ("stream", STREAM),
        ("pubsub", PUBSUB),
        ("admin", ADMIN),
        ("fast", FAST),
        ("slow", SLOW),
        ("blocking", BLOCKING),
        ("dangerous", DANGEROUS),
        ("connection", CONNECTION),
        ("transaction", TRANSACTION),
        ("scripting", SCRIPTING),
    ];

    /// The bit of category `name` (without the `@`, any case).
    #[must_use]
    pub fn by_name(name: &str) -> Option<u32> {
        ALL.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, bit)| bit)
    }
}

/// Key-spec flags (Redis's `key_specs[].flags`).
pub mod key_flag {
    /// Read-only access to the key.
    pub const RO: u16 = 1 << 0;
    /// Read-write access.
    pub const RW: u16 = 1 << 1;
    /// Overwrite: the old value is not read.
    pub const OW: u16 = 1 << 2;
    /// The key is deleted.
    pub const RM: u16 = 1 << 3;
    /// The value is returned or influences the reply.
    pub const ACCESS: u16 = 1 << 4;
    /// The value is updated.
    pub const UPDATE: u16 = 1 << 5;
    /// New data is inserted.
    pub const INSERT: u16 = 1 << 6;
    /// Data is deleted.
    pub const DELETE: u16 = 1 << 7;
    /// The argument is not really a key (e.g. a channel).
    pub const NOT_KEY: u16 = 1 << 8;
    /// The spec may not find every key.
    pub const INCOMPLETE: u16 = 1 << 9;
    /// The flags depend on the arguments.
    pub const VARIABLE_FLAGS: u16 = 1 << 10;
}

/// Where the search for a key spec's keys begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginSearch {
    /// At a fixed argument index (the command name is index 0).
    Index(i32),
    /// After the first occurrence of `keyword`, searching from `start_from`
    /// (negative: from the end, backwards).
    Keyword {
        /// The keyword, upper case as Redis reports it.
        keyword: &'static str,
        /// Where the search starts.
        start_from: i32,
    },
    /// The command's own code finds the keys (movable keys).
    Unknown,
}

/// How keys are found once the search has begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindKeys {
    /// Keys run from the begin index to `last_key` (relative; `-1` is the last
    /// argument), every `step` arguments; `limit` > 1 means "stop after
    /// 1/limit of the remaining arguments".
    Range {
        /// Last key, relative to the begin index (negative: from the end).
        last_key: i32,
        /// Distance between keys.
        step: i32,
        /// Divisor of the remaining arguments (0 or 1: no limit).
        limit: i32,
    },
    /// The number of keys is an argument at `key_num_idx` (relative to the
    /// begin index); keys start at `first_key` (relative), every `step`.
    KeyNum {
        /// Index of the key count, relative to the begin index.
        key_num_idx: i32,
        /// First key, relative to the begin index.
        first_key: i32,
        /// Distance between keys.
        step: i32,
    },
    /// The command's own code finds the keys.
    Unknown,
}

/// One key spec: which arguments are keys and how they are accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// Access flags (`key_flag::*`).
    pub flags: u16,
    /// Where to begin.
    pub begin: BeginSearch,
    /// How to find the keys from there.
    pub find: FindKeys,
}

/// One command (or subcommand) as Redis describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandSpec {
    /// Lower-case name; subcommands as `container|sub` (e.g. `client|setname`).
    pub name: &'static str,
    /// Position in the generated table (0..[`super::COUNT`]), for bitsets of
    /// commands such as a user's permissions.
    pub id: u16,
    /// Redis arity: positive = exact argument count including the name,
    /// negative = at least that many.
    pub arity: i32,
    /// Union of `flag::*`.
    pub flags: u32,
    /// Union of `acl::*`: the ACL categories Redis puts the command in.
    pub acl: u32,
    /// Key specs, in Redis's order.
    pub key_specs: &'static [KeySpec],
    /// Subcommands, sorted by name (empty for plain commands).
    pub subcommands: &'static [CommandSpec],
}

impl CommandSpec {
    /// True when every bit of `flags` is set.
    #[inline]
    pub const fn has(&self, flags: u32) -> bool {
        self.flags & flags == flags
    }

    /// True when some key spec may change its keys (RW, OW, RM, UPDATE,
    /// INSERT, DELETE): every write, scripts, and the odd command flagged
    /// read-only that still rewrites its key — PFCOUNT stores the cardinality
    /// it computes in the value, which GET then returns.
    #[inline]
    pub fn modifies_keys(&self) -> bool {
        const CHANGES: u16 = key_flag::RW
            | key_flag::OW
            | key_flag::RM
            | key_flag::UPDATE
            | key_flag::INSERT
            | key_flag::DELETE;
        self.key_specs.iter().any(|k| k.flags & CHANGES != 0)
    }

    /// True when `argc` (arguments including the command name) fits the arity.
    #[inline]
    pub const fn arity_ok(&self, argc: usize) -> bool {
        let argc = argc as i64;
        let arity = self.arity as i64;
        if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        }
    }
}
