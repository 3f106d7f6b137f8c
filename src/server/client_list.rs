//! `CLIENT LIST` and `CLIENT INFO` as nearcache answers them: its own
//! clients, the ones `CLIENT ID` numbers and `CLIENT KILL` closes, not
//! Redis's view, where they all share a few upstream connections.
//!
//! Nearcache writes each line as Redis 7.0 does, field for field. What only
//! Redis knows comes from Redis for a client pinned to a dedicated
//! connection (subscribed, in a transaction, blocked, relayed): that
//! connection's flags, subscription counts, queued commands and buffers. A
//! client on the shared connections has none of that state: its flags are
//! `N` (or `e`), its counts zero, and the buffer fields are 0, as nearcache
//! does not account memory per client the way Redis does.

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::Bytes;

use super::directory::{ClientType, ClientView};
use crate::protocol::parser::parse_i64;

/// Which clients `CLIENT LIST` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListFilter {
    /// Every client.
    All,
    /// `TYPE <type>`.
    Type(ClientType),
    /// `ID <id> …`: those clients, in the order given (repeats repeat).
    Ids(Vec<i64>),
}

impl ListFilter {
    /// Reads `CLIENT LIST`'s arguments (after `LIST`) as Redis 7.0 does, with
    /// its error for the first bad one.
    pub fn parse(args: &[Bytes]) -> Result<ListFilter, String> {
        match args {
            [] => Ok(ListFilter::All),
            [name, kind] if name.eq_ignore_ascii_case(b"type") => {
                Ok(ListFilter::Type(ClientType::parse(kind)?))
            }
            [name, ids @ ..] if name.eq_ignore_ascii_case(b"id") && !ids.is_empty() => ids
                .iter()
                .map(|id| parse_i64(id).ok_or_else(|| "ERR Invalid client ID".to_owned()))
                .collect::<Result<_, _>>()
                .map(ListFilter::Ids),
            _ => Err("ERR syntax error".into()),
        }
    }

    /// The clients it selects from `clients` (sorted by id), before `TYPE`,
    /// which needs each client's flags.
    pub fn select<'a>(&self, clients: &'a [ClientView]) -> Vec<&'a ClientView> {
        match self {
            ListFilter::All | ListFilter::Type(_) => clients.iter().collect(),
            ListFilter::Ids(ids) => ids
                .iter()
                .filter_map(|&id| {
                    let id = u64::try_from(id).ok()?;
                    let at = clients.binary_search_by_key(&id, |c| c.id).ok()?;
                    Some(&clients[at])
                })
                .collect(),
        }
    }

    /// Whether a client whose line has `flags` passes the `TYPE` filter.
    fn admits(&self, flags: &str) -> bool {
        // As Redis types clients: a MONITOR is `normal`, and nearcache
        // never has masters or replicas among its clients.
        let pubsub = flags.contains('P');
        match self {
            ListFilter::Type(ClientType::Pubsub) => pubsub,
            ListFilter::Type(ClientType::Normal) => !pubsub,
            ListFilter::Type(ClientType::Master | ClientType::Replica) => false,
            ListFilter::All | ListFilter::Ids(_) => true,
        }
    }
}

/// What the line of the client asking shows differently: the command
/// running now, and no idle time.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The caller's id.
    pub id: u64,
    /// The command being run (`client|list`, `client|info`).
    pub cmd: &'static str,
}

/// The lines of `clients` that pass `filter`, each ending in `\n`, as one
/// text. `redis` holds Redis's lines for pinned clients' connections, by
/// Redis id ([`redis_lines`]); `session_of` maps a Redis id back to the
/// nearcache client pinned to it (for `redir=`).
pub fn render(
    clients: &[&ClientView],
    filter: &ListFilter,
    redis: &HashMap<u64, &str>,
    caller: Caller,
    session_of: impl Fn(u64) -> Option<u64>,
) -> String {
    let mut out = String::with_capacity(clients.len() * 320);
    let mut line = String::with_capacity(320);
    for client in clients {
        line.clear();
        let theirs = client.redis_id.and_then(|r| redis.get(&r).copied());
        let flags = write_line(&mut line, client, theirs, caller, &session_of);
        if filter.admits(&flags) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// Writes one client's line; returns its flags.
fn write_line(
    out: &mut String,
    c: &ClientView,
    theirs: Option<&str>,
    caller: Caller,
    session_of: &impl Fn(u64) -> Option<u64>,
) -> String {
    let me = c.id == caller.id;
    let p = &c.profile;
    let idle = if me { 0 } else { c.idle.as_secs() };
    let cmd = if me { caller.cmd } else { p.cmd };
    let name = p.name.as_deref().map(String::from_utf8_lossy);
    let name = name.as_deref().unwrap_or("");
    // Ours for what nearcache knows better (the connection, the name, the
    // clock, the session's database and protocol); `e` is ours too, since
    // Redis never sees NO-EVICT.
    let flags_of = |redis: &str| {
        let mut flags = if redis == "N" || redis.is_empty() {
            String::new()
        } else {
            redis.to_owned()
        };
        if p.no_evict {
            flags.push('e');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        flags
    };
    let mut flags = flags_of(if c.pubsub && theirs.is_none() {
        "P"
    } else {
        "N"
    });
    let mut first = true;
    let mut field = |out: &mut String, key: &str, value: &dyn std::fmt::Display| {
        if !first {
            out.push(' ');
        }
        first = false;
        let _ = write!(out, "{key}={value}");
    };
    let Some(theirs) = theirs else {
        let fields: [(&str, &dyn std::fmt::Display); 27] = [
            ("id", &c.id),
            ("addr", &c.addr),
            ("laddr", &c.laddr),
            ("fd", &c.fd),
            ("name", &name),
            ("age", &c.age.as_secs()),
            ("idle", &idle),
            ("flags", &flags),
            ("db", &p.db),
            ("sub", &0),
            ("psub", &0),
            ("ssub", &0),
            ("multi", &-1),
            ("qbuf", &0),
            ("qbuf-free", &0),
            ("argv-mem", &0),
            ("multi-mem", &0),
            ("rbs", &0),
            ("rbp", &0),
            ("obl", &0),
            ("oll", &0),
            ("omem", &0),
            ("tot-mem", &0),
            ("events", &"r"),
            ("cmd", &cmd),
            ("user", &p.user),
            ("redir", &-1),
        ];
        for (key, value) in fields {
            field(out, key, value);
        }
        field(out, "resp", &p.resp);
        return flags;
    };
    // Redis's fields in Redis's order (a newer Redis may have more).
    for pair in theirs.split(' ') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "id" => field(out, key, &c.id),
            "addr" => field(out, key, &c.addr),
            "laddr" => field(out, key, &c.laddr),
            "fd" => field(out, key, &c.fd),
            "name" => field(out, key, &name),
            "age" => field(out, key, &c.age.as_secs()),
            "idle" => field(out, key, &idle),
            "flags" => {
                flags = flags_of(value);
                field(out, key, &flags);
            }
            "db" => field(out, key, &p.db),
            "cmd" => field(out, key, &cmd),
            "user" => field(out, key, &p.user),
            "resp" => field(out, key, &p.resp),
            "redir" => match value.parse::<u64>().ok().and_then(session_of) {
                Some(ours) => field(out, key, &ours),
                None => field(out, key, &value),
            },
            _ => field(out, key, &value),
        }
    }
    flags
}

/// Redis's `CLIENT LIST` text, line by line, by the id each line starts
/// with.
pub fn redis_lines(text: &str) -> HashMap<u64, &str> {
    text.lines()
        .filter_map(|line| {
            let id = line.strip_prefix("id=")?.split(' ').next()?.parse().ok()?;
            Some((id, line))
        })
        .collect()
}

/// The text of a bulk or verbatim string reply (`$n` or `=n` with `txt:`).
pub fn text_of(frame: &[u8]) -> Option<&str> {
    let start = frame.iter().position(|&b| b == b'\n')? + 1;
    let body = frame.get(start..frame.len().checked_sub(2)?)?;
    let body = match frame.first()? {
        b'$' => body,
        b'=' => body.get(4..)?,
        _ => return None,
    };
    std::str::from_utf8(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::directory::Profile;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn client(id: u64, redis_id: Option<u64>) -> ClientView {
        ClientView {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 50_000 + id as u16)),
            laddr: SocketAddr::from(([127, 0, 0, 1], 6380)),
            fd: 10 + id as i64,
            age: Duration::from_secs(5),
            idle: Duration::from_millis(2500),
            pubsub: false,
            redis_id,
            profile: Profile {
                cmd: "get",
                ..Profile::default()
            },
        }
    }

    fn args(s: &str) -> Vec<Bytes> {
        s.split_whitespace()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    #[test]
    fn filters_parse_as_redis_7_0_reads_them() {
        assert_eq!(ListFilter::parse(&args("")), Ok(ListFilter::All));
        assert_eq!(
            ListFilter::parse(&args("type PubSub")),
            Ok(ListFilter::Type(ClientType::Pubsub))
        );
        assert_eq!(
            ListFilter::parse(&args("ID 3 -1 3")),
            Ok(ListFilter::Ids(vec![3, -1, 3]))
        );
        let err = |a: &str| ListFilter::parse(&args(a)).expect_err(a);
        assert_eq!(err("type x"), "ERR Unknown client type 'x'");
        assert_eq!(err("id 3 x"), "ERR Invalid client ID");
        assert_eq!(err("id"), "ERR syntax error");
        assert_eq!(err("type normal id 1"), "ERR syntax error");
        assert_eq!(err("nosuch"), "ERR syntax error");
    }

    #[test]
    fn a_client_on_shared_connections_gets_a_line_of_its_own() {
        let c = client(7, None);
        let caller = Caller {
            id: 9,
            cmd: "client|list",
        };
        let text = render(&[&c], &ListFilter::All, &HashMap::new(), caller, |_| None);
        assert_eq!(
            text,
            "id=7 addr=127.0.0.1:50007 laddr=127.0.0.1:6380 fd=17 name= age=5 idle=2 \
             flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 \
             multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd=get \
             user=default redir=-1 resp=2\n"
        );
        // The caller's own line shows the command running, and no idle time.
        let me = Caller { id: 7, ..caller };
        let text = render(&[&c], &ListFilter::All, &HashMap::new(), me, |_| None);
        assert!(text.contains(" idle=0 ") && text.contains(" cmd=client|list "));
    }

    #[test]
    fn a_pinned_client_shows_redis_state_with_its_own_identity() {
        let mut c = client(7, Some(40));
        c.profile.no_evict = true;
        c.profile.name = Some(Bytes::from_static(b"bot"));
        let theirs = "id=40 addr=127.0.0.1:7000 laddr=127.0.0.1:6379 fd=9 name= age=100 \
                      idle=0 flags=Pt db=0 sub=2 psub=1 ssub=0 multi=-1 qbuf=0 qbuf-free=0 \
                      argv-mem=0 multi-mem=0 rbs=1024 rbp=0 obl=0 oll=0 omem=0 tot-mem=1 \
                      events=r cmd=ping user=proxy redir=41 resp=2 lib-name= lib-ver=";
        let text = format!("{theirs}\nid=41 x\n");
        let redis = redis_lines(&text);
        assert_eq!(redis.len(), 2);
        let caller = Caller {
            id: 9,
            cmd: "client|list",
        };
        let session_of = |r| (r == 41).then_some(8);
        let text = render(&[&c], &ListFilter::All, &redis, caller, session_of);
        assert_eq!(
            text,
            "id=7 addr=127.0.0.1:50007 laddr=127.0.0.1:6380 fd=17 name=bot age=5 idle=2 \
             flags=Pte db=0 sub=2 psub=1 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 \
             multi-mem=0 rbs=1024 rbp=0 obl=0 oll=0 omem=0 tot-mem=1 events=r cmd=get \
             user=default redir=8 resp=2 lib-name= lib-ver=\n"
        );
        // TYPE goes by the flags Redis reports.
        let pubsub = ListFilter::Type(ClientType::Pubsub);
        assert_eq!(render(&[&c], &pubsub, &redis, caller, session_of), text);
        let normal = ListFilter::Type(ClientType::Normal);
        assert_eq!(render(&[&c], &normal, &redis, caller, session_of), "");
    }

    #[test]
    fn ids_select_in_the_order_given() {
        let clients = [client(3, None), client(5, None)];
        let picked = ListFilter::Ids(vec![5, 4, 3, 5, -1]).select(&clients);
        let ids: Vec<u64> = picked.iter().map(|c| c.id).collect();
        assert_eq!(ids, [5, 3, 5]);
    }

    #[test]
    fn text_comes_out_of_bulk_and_verbatim_replies() {
        assert_eq!(text_of(b"$3\r\nabc\r\n"), Some("abc"));
        assert_eq!(text_of(b"=7\r\ntxt:abc\r\n"), Some("abc"));
        assert_eq!(text_of(b"-ERR x\r\n"), None);
        assert_eq!(text_of(b"$"), None);
    }
}
