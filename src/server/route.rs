//! Routing: what the proxy does with each command.
//!
//! Most commands are forwarded over a shared connection. The ones listed here
//! change connection state, and Redis ties that state to a connection: they
//! are answered by the proxy itself (the session's state lives here), or they
//! pin the client to a dedicated upstream connection for as long as the state
//! lasts (transactions, blocking commands, pub/sub, MONITOR…).

use bytes::Bytes;

use crate::command::{self, CommandSpec, flag};

/// What to do with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Forward over the shared connection (or the pinned one, if pinned).
    Forward,
    /// `QUIT`: reply `+OK` and close.
    Quit,
    /// `AUTH`: checked against `server.password`.
    Auth,
    /// `HELLO`: protocol switch, answered by the proxy.
    Hello,
    /// `SELECT`: moves the session to another database's pool.
    Select,
    /// `RESET`: back to a fresh connection's state.
    Reset,
    /// `CLIENT SETNAME`.
    ClientSetName,
    /// `CLIENT GETNAME`.
    ClientGetName,
    /// `CLIENT GETREDIR`: the redirect by the id the client knows
    /// (nearcache's), not Redis's for the connection it names.
    ClientGetRedir,
    /// `CLIENT ID`: the proxy's id for this client.
    ClientId,
    /// `CLIENT UNBLOCK <id>`: the id is the proxy's; Redis needs its own.
    ClientUnblock,
    /// `CLIENT KILL …`: closes the proxy's clients.
    ClientKill,
    /// `CLIENT REPLY ON|OFF|SKIP`: the proxy drops the client's replies
    /// (Redis still answers it, so writes are acknowledged as usual).
    ClientReply,
    /// `CLIENT LIST`: the proxy's clients.
    ClientList,
    /// `CLIENT INFO`: the proxy's view of this client.
    ClientInfo,
    /// `CLIENT NO-EVICT on|off`: about the client's own connection, which
    /// Redis never sees (its upstream connections are shared).
    ClientNoEvict,
    /// `MULTI`: pins a dedicated connection.
    Multi,
    /// `WATCH`: pins a dedicated connection.
    Watch,
    /// `EXEC` / `DISCARD`: ends the transaction (and the watch).
    EndTransaction,
    /// `UNWATCH`.
    Unwatch,
    /// A command that may block its connection: runs on a dedicated one.
    Blocking,
    /// `WAIT` / `WAITAOF`: blocks like [`Route::Blocking`], but counts acks
    /// for the writes of the connection it runs on, so it needs more care.
    Wait,
    /// A script or function (`EVAL`, `EVALSHA`, `FCALL` and their `_RO`
    /// forms): forwarded, on a connection of its own when not pinned.
    Script,
    /// Commands after which replies stop pairing with commands (pub/sub,
    /// MONITOR, CLIENT TRACKING): the client gets a dedicated connection
    /// whose every frame is relayed.
    Relay,
    /// Not possible through a proxy; the text is the error reply.
    Refuse(&'static str),
    /// A known command with the wrong number of arguments (its name).
    WrongArity(&'static str),
    /// `PROXY …`: nearcache's own admin commands.
    Proxy,
    /// `ACL WHOAMI`: the user the client is, as nearcache knows it.
    AclWhoami,
    /// `INFO [section …]`: Redis's reply with nearcache's own section
    /// appended when the sections asked for include it; `INFO nearcache`
    /// alone is answered here (see `session/info.rs`).
    Info,
}

impl Route {
    /// The commands nearcache answers itself from the session's state, which
    /// Redis would queue inside MULTI and answer in any state but a RESP2
    /// subscriber's (see `session/local.rs`).
    pub fn answered_locally(self) -> bool {
        matches!(
            self,
            Route::Auth
                | Route::ClientSetName
                | Route::ClientGetName
                | Route::ClientGetRedir
                | Route::ClientId
                | Route::ClientKill
                | Route::ClientNoEvict
                | Route::ClientList
                | Route::ClientInfo
                | Route::AclWhoami
        )
    }
}

/// Commands that may block their client: Redis runs nothing else from that
/// client until they answer. (XREAD and XREADGROUP only with BLOCK.)
const MAY_BLOCK: &[&str] = &[
    "blpop",
    "brpop",
    "brpoplpush",
    "blmove",
    "blmpop",
    "bzpopmin",
    "bzpopmax",
    "bzmpop",
    "wait",
    "waitaof",
];

/// Whether a command may block its client, judged from its name and
/// arguments without routing it (the input loop asks this of every command,
/// so a first-byte test settles nearly all of them).
pub fn may_block<'a>(name: &[u8], mut args: impl Iterator<Item = &'a [u8]>) -> bool {
    match name.first() {
        Some(b'b' | b'B' | b'w' | b'W') => MAY_BLOCK
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes())),
        Some(b'x' | b'X') => {
            (name.eq_ignore_ascii_case(b"xread") || name.eq_ignore_ascii_case(b"xreadgroup"))
                && args.any(|a| a.eq_ignore_ascii_case(b"block"))
        }
        _ => false,
    }
}

/// Routes a command and returns its spec too (None for unknown commands),
/// so the caller does not look it up twice.
pub fn route_spec(argv: &[Bytes]) -> (Route, Option<&'static CommandSpec>) {
    if argv[0].eq_ignore_ascii_case(b"proxy") {
        return (Route::Proxy, None);
    }
    let spec = command::resolve(argv);
    (route_resolved(argv, spec), spec)
}

/// Routes a command (`argv[0]` is its name; `argv` is never empty).
pub fn route(argv: &[Bytes]) -> Route {
    route_resolved(argv, command::resolve(argv))
}

fn route_resolved(argv: &[Bytes], spec: Option<&'static CommandSpec>) -> Route {
    let Some(spec) = spec else {
        // WAITAOF is newer than the table (Redis 7.2) and blocks like WAIT.
        if argv[0].eq_ignore_ascii_case(b"waitaof") {
            return Route::Wait;
        }
        // Unknown here (a module command, or a newer Redis): Redis decides.
        return Route::Forward;
    };
    // Subcommands too (`CLIENT GETNAME x`); a container whose subcommand is
    // unknown resolves to the container, whose loose arity lets Redis answer.
    if !spec.arity_ok(argv.len()) {
        return Route::WrongArity(spec.name);
    }
    // Fast path: plain data commands carry none of these flags.
    const STATEFUL: u32 = flag::CONNECTION
        | flag::TRANSACTION
        | flag::BLOCKING
        | flag::PUBSUB
        | flag::ADMIN
        | flag::SCRIPTING;
    if spec.flags & STATEFUL == 0 {
        // (INFO carries none of them either; a length test settles the rest.)
        if spec.name.len() == 4 && spec.name == "info" {
            return Route::Info;
        }
        if spec.name == "acl|whoami" {
            return Route::AclWhoami;
        }
        return Route::Forward;
    }
    match spec.name {
        "quit" => Route::Quit,
        "auth" => Route::Auth,
        "hello" => Route::Hello,
        "select" => Route::Select,
        "reset" => Route::Reset,
        "client|setname" => Route::ClientSetName,
        "client|getname" => Route::ClientGetName,
        "client|getredir" => Route::ClientGetRedir,
        "client|id" => Route::ClientId,
        "client|unblock" => Route::ClientUnblock,
        "client|kill" => Route::ClientKill,
        "client|no-evict" => Route::ClientNoEvict,
        "client|list" => Route::ClientList,
        "client|info" => Route::ClientInfo,
        "client|reply" => Route::ClientReply,
        "client|tracking" => match argv.get(2) {
            Some(mode) if mode.eq_ignore_ascii_case(b"off") => Route::Forward,
            _ => Route::Relay,
        },
        "wait" | "waitaof" => Route::Wait,
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro" => Route::Script,
        "multi" => Route::Multi,
        "watch" => Route::Watch,
        "exec" | "discard" => Route::EndTransaction,
        "unwatch" => Route::Unwatch,
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe"
        | "sunsubscribe" | "monitor" => Route::Relay,
        "sync" | "psync" | "replconf" => Route::Refuse(
            "ERR replication through nearcache is not supported; connect replicas to Redis directly",
        ),
        "xread" | "xreadgroup" => {
            if argv
                .iter()
                .skip(1)
                .any(|a| a.eq_ignore_ascii_case(b"block"))
            {
                Route::Blocking
            } else {
                Route::Forward
            }
        }
        _ if spec.has(flag::BLOCKING) => Route::Blocking,
        _ => Route::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(args: &[&str]) -> Route {
        let argv: Vec<Bytes> = args
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        route(&argv)
    }

    #[test]
    fn data_commands_are_forwarded() {
        assert_eq!(r(&["GET", "k"]), Route::Forward);
        assert_eq!(r(&["set", "k", "v", "EX", "10"]), Route::Forward);
        assert_eq!(r(&["FT.SEARCH", "idx", "q"]), Route::Forward);
        assert_eq!(r(&["XREAD", "STREAMS", "s", "0"]), Route::Forward);
    }

    #[test]
    fn stateful_commands_are_routed() {
        assert_eq!(r(&["MULTI"]), Route::Multi);
        assert_eq!(r(&["exec"]), Route::EndTransaction);
        assert_eq!(r(&["WATCH", "a", "b"]), Route::Watch);
        assert_eq!(r(&["BLPOP", "q", "0"]), Route::Blocking);
        assert_eq!(
            r(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]),
            Route::Blocking
        );
        assert_eq!(r(&["WAIT", "1", "100"]), Route::Wait);
        assert_eq!(r(&["waitaof", "1", "0", "100"]), Route::Wait);
        assert_eq!(r(&["SUBSCRIBE", "ch"]), Route::Relay);
        assert_eq!(r(&["EVALSHA", "abc", "0"]), Route::Script);
        assert_eq!(r(&["fcall_ro", "f", "0"]), Route::Script);
        assert_eq!(r(&["SCRIPT", "KILL"]), Route::Forward);
        assert_eq!(r(&["MONITOR"]), Route::Relay);
        assert_eq!(r(&["CLIENT", "REPLY", "OFF"]), Route::ClientReply);
        assert_eq!(r(&["CLIENT", "SETNAME", "x"]), Route::ClientSetName);
        assert_eq!(r(&["client", "unblock", "7"]), Route::ClientUnblock);
        assert_eq!(r(&["CLIENT", "NO-EVICT", "on"]), Route::ClientNoEvict);
        assert_eq!(r(&["select", "2"]), Route::Select);
        assert_eq!(r(&["INFO"]), Route::Info);
        assert_eq!(r(&["info", "nearcache", "server"]), Route::Info);
        assert!(matches!(r(&["PSYNC", "?", "-1"]), Route::Refuse(_)));
    }

    #[test]
    fn may_block_names_exactly_the_commands_routed_as_blocking() {
        let blocks =
            |args: &[&str]| may_block(args[0].as_bytes(), args[1..].iter().map(|a| a.as_bytes()));
        for spec in command::all() {
            let name = spec.name.to_uppercase();
            // As many arguments as the arity asks; the route then depends on
            // the name (and, for XREAD, on BLOCK).
            let argc = (1..16)
                .find(|&n| spec.arity_ok(n))
                .expect("some arity fits");
            let mut args = vec![name.as_str()];
            args.extend(std::iter::repeat_n("1", argc - 1));
            let routed = matches!(r(&args), Route::Blocking | Route::Wait);
            assert_eq!(blocks(&args), routed, "{name}");
        }
        assert!(blocks(&["waitaof", "1", "0", "100"]));
        assert!(blocks(&["XREADGROUP", "GROUP", "g", "c", "block", "0"]));
        assert!(!blocks(&["XREAD", "STREAMS", "s", "0"]));
        assert!(!blocks(&["BITCOUNT", "k"]));
        assert!(!blocks(&["GET", "k"]));
    }

    #[test]
    fn wrong_arity_is_caught_locally() {
        assert_eq!(r(&["GET"]), Route::WrongArity("get"));
        assert_eq!(r(&["GET", "a", "b"]), Route::WrongArity("get"));
        assert_eq!(r(&["SET", "k"]), Route::WrongArity("set"));
        assert_eq!(
            r(&["CLIENT", "GETNAME", "x"]),
            Route::WrongArity("client|getname")
        );
        assert_eq!(
            r(&["CLIENT", "SETNAME", "a", "b"]),
            Route::WrongArity("client|setname")
        );
        assert_eq!(r(&["CLIENT"]), Route::WrongArity("client"));
        assert_eq!(r(&["CLIENT", "NOSUCH"]), Route::Forward);
    }
}
