//! Nearcache's clients, for the commands that name another client: `CLIENT
//! LIST` shows nearcache's clients and `CLIENT KILL` closes them (not the
//! upstream connections they share), and `CLIENT TRACKING on REDIRECT <id>` and `CLIENT UNBLOCK <id>`
//! take the id a client got from `CLIENT ID`, which is nearcache's; Redis
//! knows that client only by the Redis id of the dedicated connection it is
//! pinned to (a subscriber to `__redis__:invalidate` always is) or blocked
//! on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::transport::Peer;
use crate::protocol::Protocol;
use crate::protocol::parser::{keyword, parse_i64};
use crate::upstream::Conn;

/// Sessions pinned to (or blocked on) a dedicated connection, by nearcache
/// id → Redis id; and every session, by id, for `CLIENT KILL` and `CLIENT
/// LIST`.
#[derive(Debug)]
pub struct Directory {
    pinned: Mutex<HashMap<u64, u64>>,
    sessions: Mutex<HashMap<u64, Client>>,
    /// Zero of the sessions' activity clock ([`Enrollment::touch`]).
    epoch: Instant,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            pinned: Mutex::default(),
            sessions: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

/// A running session, as the commands that name other clients see it.
#[derive(Debug)]
struct Client {
    /// Signals the session to close.
    kill: Option<oneshot::Sender<()>>,
    /// Already killed (by another client, or by itself): counted once.
    told: bool,
    /// The client's end of the connection.
    addr: SocketAddr,
    /// Nearcache's end of the connection.
    laddr: SocketAddr,
    /// Nearcache's descriptor for the connection.
    fd: i64,
    /// When the client connected.
    since: Instant,
    /// What the session publishes about itself.
    shown: Arc<Shown>,
    /// A dedicated connection held for it since another client named it as
    /// its `CLIENT TRACKING` redirect (see [`Directory::reserve`]).
    reserved: Option<Reserved>,
}

/// A connection held for a session, and the pool it came from.
#[derive(Debug)]
pub struct Reserved {
    /// The connection.
    pub conn: Conn,
    /// Its database.
    pub db: u32,
    /// Its protocol.
    pub proto: Protocol,
}

/// What a session publishes about itself, read by other clients' `CLIENT
/// LIST` and `CLIENT KILL` whenever they run.
#[derive(Debug, Default)]
struct Shown {
    /// Subscribed (Redis's `pubsub` client type).
    pubsub: AtomicBool,
    /// When it last ran commands: milliseconds since the directory's epoch.
    active_ms: AtomicU64,
    /// The rest, which changes only with a few commands.
    profile: Mutex<Profile>,
}

/// A session's state as `CLIENT LIST` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// `CLIENT SETNAME`'s name.
    pub name: Option<Bytes>,
    /// The selected database.
    pub db: u32,
    /// The protocol version (2 or 3).
    pub resp: i64,
    /// `CLIENT NO-EVICT on`.
    pub no_evict: bool,
    /// The last command run (`NULL` before the first, as Redis writes it).
    pub cmd: &'static str,
    /// The user it runs as.
    pub user: Arc<str>,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            name: None,
            db: 0,
            resp: 2,
            no_evict: false,
            cmd: "NULL",
            user: "default".into(),
        }
    }
}

/// A client as [`Directory::clients`] found it.
#[derive(Debug, Clone)]
pub struct ClientView {
    /// Nearcache's id (`CLIENT ID`).
    pub id: u64,
    /// The client's end of the connection.
    pub addr: SocketAddr,
    /// Nearcache's end.
    pub laddr: SocketAddr,
    /// Nearcache's descriptor for the connection.
    pub fd: i64,
    /// Time since the client connected.
    pub age: Duration,
    /// Time since it last ran commands.
    pub idle: Duration,
    /// Subscribed since it started or last reset.
    pub pubsub: bool,
    /// Redis's id for the dedicated connection it is pinned to, if any.
    pub redis_id: Option<u64>,
    /// The rest of its state.
    pub profile: Profile,
}

/// A session's place in the [`Directory`] for as long as it runs.
#[derive(Debug)]
pub struct Enrollment {
    directory: Arc<Directory>,
    session: u64,
    shown: Arc<Shown>,
}

impl Enrollment {
    /// Marks the session as subscribed (from a SUBSCRIBE, PSUBSCRIBE or
    /// SSUBSCRIBE sent, until Redis reports no subscription left or RESET),
    /// or not.
    pub fn set_pubsub(&self, on: bool) {
        self.shown.pubsub.store(on, Relaxed);
    }

    /// Whether the session may be subscribed: it sent a subscription, and
    /// Redis has not since reported it left every channel.
    pub fn pubsub(&self) -> bool {
        self.shown.pubsub.load(Relaxed)
    }

    /// A handle for the session's relay connection, which sees Redis's
    /// subscription counts.
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            shown: self.shown.clone(),
            counts: [0; 2],
        }
    }

    /// Records that the session ran commands just now (one clock read and
    /// one store, per batch of commands read).
    pub fn touch(&self) {
        let ms = self.directory.epoch.elapsed().as_millis();
        self.shown
            .active_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Relaxed);
    }

    /// Publishes the session's state (the caller compares first: this
    /// takes a lock).
    pub fn publish(&self, profile: &Profile) {
        let mut shown = self.shown.profile.lock().unwrap_or_else(|e| e.into_inner());
        shown.clone_from(profile);
    }
}

/// What a relaying connection keeps of a client's subscriptions: the counts
/// Redis's own (un)subscribe replies report, which say when the client has
/// left every channel (Redis then takes any command from it again, and it is
/// no longer of type `pubsub`).
#[derive(Debug)]
pub struct Subscriptions {
    shown: Arc<Shown>,
    /// Channels and patterns; shard channels.
    counts: [i64; 2],
}

impl Subscriptions {
    /// Notes a relayed frame: an (un)subscribe reply carries the count.
    pub fn saw(&mut self, frame: &[u8]) {
        if let Some((shard, count)) = subscription_count(frame) {
            self.counts[usize::from(shard)] = count;
            let any = self.counts.iter().any(|&n| n > 0);
            self.shown.pubsub.store(any, Relaxed);
        }
    }
}

/// The count in an (un)subscribe reply — `*3` (RESP2) or `>3` (RESP3) of the
/// kind, the channel (or nil) and an integer — and whether it counts shard
/// channels; None for any other frame.
fn subscription_count(frame: &[u8]) -> Option<(bool, i64)> {
    const REGULAR: [&[u8]; 4] = [b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe"];
    const SHARD: [&[u8]; 2] = [b"ssubscribe", b"sunsubscribe"];
    let rest = frame
        .strip_prefix(b"*3\r\n$")
        .or_else(|| frame.strip_prefix(b">3\r\n$"))?;
    let nl = rest.iter().position(|&b| b == b'\r')?;
    let len = usize::try_from(parse_i64(&rest[..nl])?).ok()?;
    let name = rest.get(nl + 2..nl + 2 + len)?;
    let shard = if REGULAR.contains(&name) {
        false
    } else if SHARD.contains(&name) {
        true
    } else {
        return None;
    };
    let count = frame.strip_suffix(b"\r\n")?;
    let colon = count.iter().rposition(|&b| b == b':')?;
    Some((shard, parse_i64(&count[colon + 1..])?))
}

impl Drop for Enrollment {
    fn drop(&mut self) {
        let client = self
            .directory
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
        // A connection held for it and never taken goes (closed) with it.
        if let Some(reserved) = client.and_then(|c| c.reserved) {
            let mut pinned = self.directory.lock();
            if pinned.get(&self.session) == Some(&reserved.conn.redis_id()) {
                pinned.remove(&self.session);
            }
        }
    }
}

/// A client type, as `CLIENT KILL TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientType {
    /// Any client that is not one of the others.
    Normal,
    /// A replica (never a client of nearcache, which refuses replication).
    Replica,
    /// The master link (never a client of nearcache).
    Master,
    /// A subscribed client.
    Pubsub,
}

impl ClientType {
    /// A type by the name `TYPE` takes, with Redis's error for others.
    pub fn parse(name: &[u8]) -> Result<ClientType, String> {
        const TYPES: &[(&str, ClientType)] = &[
            ("normal", ClientType::Normal),
            ("slave", ClientType::Replica),
            ("replica", ClientType::Replica),
            ("master", ClientType::Master),
            ("pubsub", ClientType::Pubsub),
        ];
        keyword(name, TYPES).ok_or_else(|| {
            format!(
                "ERR Unknown client type '{}'",
                String::from_utf8_lossy(name)
            )
        })
    }
}

/// The filters of one `CLIENT KILL`, all of which a client must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KillFilter {
    /// `ID`.
    pub id: Option<u64>,
    /// `ADDR` (or the old form's only argument).
    pub addr: Option<Vec<u8>>,
    /// `LADDR`.
    pub laddr: Option<Vec<u8>>,
    /// `TYPE`.
    pub kind: Option<ClientType>,
    /// `USER`.
    pub user: Option<Vec<u8>>,
    /// `SKIPME yes` (the default in the filter form): the caller is spared.
    pub skip_me: bool,
}

/// A session's entry in the [`Directory`], removed when dropped (when the
/// session lets go of the connection).
#[derive(Debug)]
pub struct Listing {
    directory: Arc<Directory>,
    session: u64,
    redis_id: u64,
}

impl Directory {
    /// Records that `session` is pinned to the connection Redis calls
    /// `redis_id`, for as long as the returned listing lives.
    pub fn list(self: &Arc<Self>, session: u64, redis_id: u64) -> Listing {
        self.lock().insert(session, redis_id);
        Listing {
            directory: self.clone(),
            session,
            redis_id,
        }
    }

    /// Enrolls a running session, connected from `addr` to nearcache's
    /// `laddr` (descriptor `fd`), until the enrollment is dropped; the
    /// receiver answers `Ok` once another client kills it. (A oneshot: the
    /// session polls it on every turn of its loop, and polling one takes no
    /// lock.)
    pub fn enroll(
        self: &Arc<Self>,
        session: u64,
        peer: &Peer,
    ) -> (Enrollment, oneshot::Receiver<()>) {
        let Peer { addr, laddr, fd } = *peer;
        let (kill, killed) = oneshot::channel();
        let shown = Arc::new(Shown::default());
        let enrollment = Enrollment {
            directory: self.clone(),
            session,
            shown: shown.clone(),
        };
        enrollment.touch();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                session,
                Client {
                    kill: Some(kill),
                    told: false,
                    addr,
                    laddr,
                    fd,
                    since: Instant::now(),
                    shown,
                    reserved: None,
                },
            );
        (enrollment, killed)
    }

    /// Sessions pinned to (or blocked on) a dedicated connection now.
    pub fn pinned_count(&self) -> usize {
        self.lock().len()
    }

    /// Every running session (the ones a kill has told to close aside, as
    /// Redis no longer lists a client it has freed), by ascending id.
    pub fn clients(&self) -> Vec<ClientView> {
        let now = self.epoch.elapsed();
        let mut views: Vec<ClientView> = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions
                .iter()
                .filter(|(_, c)| !c.told)
                .map(|(&id, c)| {
                    let active = Duration::from_millis(c.shown.active_ms.load(Relaxed));
                    ClientView {
                        id,
                        addr: c.addr,
                        laddr: c.laddr,
                        fd: c.fd,
                        age: c.since.elapsed(),
                        idle: now.saturating_sub(active),
                        pubsub: c.shown.pubsub.load(Relaxed),
                        redis_id: None,
                        profile: c
                            .shown
                            .profile
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                    }
                })
                .collect()
        };
        let pinned = self.lock();
        for view in &mut views {
            view.redis_id = pinned.get(&view.id).copied();
        }
        drop(pinned);
        views.sort_unstable_by_key(|v| v.id);
        views
    }

    /// Nearcache's id for the session pinned to Redis's connection
    /// `redis_id`, if one is (for `CLIENT LIST`'s `redir=`).
    pub fn session_of(&self, redis_id: u64) -> Option<u64> {
        self.lock()
            .iter()
            .find_map(|(&session, &r)| (r == redis_id).then_some(session))
    }

    /// Tells every session `filter` matches to close, `caller` aside (it
    /// closes itself, after its reply). Returns how many matched, the caller
    /// included unless `SKIPME yes`, and whether the caller did.
    pub fn kill(&self, filter: &KillFilter, caller: u64) -> (usize, bool) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (mut killed, mut me) = (0, false);
        for (&id, client) in sessions.iter_mut() {
            // A client already killed counts once, as one Redis has freed is
            // no longer listed (two clients killing each other at once).
            if client.told || !filter.matches(id, client) || (id == caller && filter.skip_me) {
                continue;
            }
            client.told = true;
            if id == caller {
                // Closes itself after its reply (its sender stays: dropping
                // it would end the session before the reply is written).
                me = true;
            } else if let Some(kill) = client.kill.take() {
                let _ = kill.send(());
            }
            killed += 1;
        }
        (killed, me)
    }

    /// Redis's id for the connection `session` is pinned to, if it is.
    pub fn redis_id(&self, session: u64) -> Option<u64> {
        self.lock().get(&session).copied()
    }

    /// The user `session` runs as, if it runs.
    pub fn user_of(&self, session: u64) -> Option<Arc<str>> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let client = sessions.get(&session)?;
        let profile = client
            .shown
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(profile.user.clone())
    }

    /// The database and protocol `session` is on, if it runs.
    pub fn whereabouts(&self, session: u64) -> Option<(u32, i64)> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let client = sessions.get(&session)?;
        let profile = client
            .shown
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some((profile.db, profile.resp))
    }

    /// Holds `reserved` for `session`, which another client named as its
    /// `CLIENT TRACKING` redirect while it has no dedicated connection of
    /// its own: Redis then has a client to send the invalidations to, and
    /// the session subscribes on that very connection when it starts a
    /// relay (`SUBSCRIBE __redis__:invalidate`), so they reach it. Returns
    /// the Redis id to redirect to (that of a connection already held, if
    /// any); None if the session is gone.
    pub fn reserve(&self, session: u64, reserved: Reserved) -> Option<u64> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let client = sessions.get_mut(&session)?;
        if let Some(held) = &client.reserved {
            return Some(held.conn.redis_id());
        }
        let id = reserved.conn.redis_id();
        client.reserved = Some(reserved);
        self.lock().insert(session, id);
        Some(id)
    }

    /// The connection held for `session`, if any (see
    /// [`Directory::reserve`]).
    pub fn take_reserved(&self, session: u64) -> Option<Reserved> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = sessions.get_mut(&session)?.reserved.take()?;
        // (The session lists the connection anew if it pins it.)
        let mut pinned = self.lock();
        if pinned.get(&session) == Some(&reserved.conn.redis_id()) {
            pinned.remove(&session);
        }
        Some(reserved)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How `CLIENT KILL` was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillForm {
    /// `CLIENT KILL ip:port`: answers `+OK`, or an error if no client matched.
    Old,
    /// `CLIENT KILL <filter> <value> …`: answers how many clients matched.
    Filters,
}

impl KillFilter {
    /// Reads `CLIENT KILL`'s arguments (after `KILL`) as Redis does, with
    /// Redis's error for the first bad one; `known_user` tells the users
    /// that exist (`default` alone, unless Redis decides on users).
    pub fn parse(
        args: &[Bytes],
        known_user: impl Fn(&[u8]) -> bool,
    ) -> Result<(KillFilter, KillForm), String> {
        const SYNTAX: &str = "ERR syntax error";
        if let [addr] = args {
            let filter = KillFilter {
                addr: Some(addr.to_vec()),
                ..KillFilter::default()
            };
            return Ok((filter, KillForm::Old));
        }
        let mut filter = KillFilter {
            skip_me: true,
            ..KillFilter::default()
        };
        // Pair by pair, so the first bad one is the one reported (a name
        // without a value is a syntax error where it stands).
        for pair in args.chunks(2) {
            let [name, value] = pair else {
                return Err(SYNTAX.into());
            };
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            let text = || String::from_utf8_lossy(value);
            if is("id") {
                filter.id = match parse_i64(value) {
                    Some(n) if n > 0 => Some(n as u64),
                    _ => return Err("ERR client-id should be greater than 0".into()),
                };
            } else if is("type") {
                filter.kind = Some(ClientType::parse(value)?);
            } else if is("addr") {
                filter.addr = Some(value.to_vec());
            } else if is("laddr") {
                filter.laddr = Some(value.to_vec());
            } else if is("user") {
                if !known_user(value) {
                    return Err(format!("ERR No such user '{}'", text()));
                }
                filter.user = Some(value.to_vec());
            } else if is("skipme") {
                filter.skip_me = if value.eq_ignore_ascii_case(b"yes") {
                    true
                } else if value.eq_ignore_ascii_case(b"no") {
                    false
                } else {
                    return Err(SYNTAX.into());
                };
            } else {
                return Err(SYNTAX.into());
            }
        }
        Ok((filter, KillForm::Filters))
    }

    fn matches(&self, id: u64, client: &Client) -> bool {
        let kind = if client.shown.pubsub.load(Relaxed) {
            ClientType::Pubsub
        } else {
            ClientType::Normal
        };
        // Addresses as Redis writes them: `ip:port`, `[ip6]:port`.
        let same = |want: &Option<Vec<u8>>, addr: SocketAddr| {
            want.as_deref()
                .is_none_or(|want| want == addr.to_string().as_bytes())
        };
        let user = || {
            let profile = client
                .shown
                .profile
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            profile.user.clone()
        };
        self.id.is_none_or(|want| want == id)
            && self.kind.is_none_or(|want| want == kind)
            && self
                .user
                .as_deref()
                .is_none_or(|want| want == user().as_bytes())
            && same(&self.addr, client.addr)
            && same(&self.laddr, client.laddr)
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let mut pinned = self.directory.lock();
        // A newer pin of the same session may have replaced this entry.
        if pinned.get(&self.session) == Some(&self.redis_id) {
            pinned.remove(&self.session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_counts_come_from_redis_s_replies() {
        let d = Arc::new(Directory::default());
        let (e, _) = d.enroll(1, &peer(1001, 6380, 8));
        let mut subs = e.subscriptions();
        e.set_pubsub(true);
        subs.saw(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
        subs.saw(b">3\r\n$10\r\nssubscribe\r\n$1\r\nb\r\n:1\r\n");
        subs.saw(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n:0\r\n");
        assert!(e.pubsub());
        subs.saw(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n");
        assert!(e.pubsub(), "still on a shard channel");
        subs.saw(b">3\r\n$12\r\nsunsubscribe\r\n_\r\n:0\r\n");
        assert!(!e.pubsub());
        assert_eq!(
            subscription_count(b"*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n"),
            Some((false, 0))
        );
        assert_eq!(subscription_count(b"+OK\r\n"), None);
    }

    fn peer(port: u16, local: u16, fd: i64) -> Peer {
        Peer {
            addr: addr(port),
            laddr: addr(local),
            fd,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn filter(args: &str) -> KillFilter {
        let args: Vec<Bytes> = args
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        KillFilter::parse(&args, |u| u == b"default")
            .expect("valid filter")
            .0
    }

    #[test]
    fn a_kill_reaches_the_matching_sessions_once() {
        let d = Arc::new(Directory::default());
        let (e3, mut killed3) = d.enroll(3, &peer(1003, 6380, 8));
        let (e4, mut killed4) = d.enroll(4, &peer(1004, 6380, 9));
        e4.set_pubsub(true);
        assert_eq!(d.kill(&filter("ID 5"), 9), (0, false));
        assert_eq!(d.kill(&filter("TYPE pubsub"), 9), (1, false));
        assert_eq!(killed4.try_recv(), Ok(()));
        // Told already: not counted again.
        assert_eq!(d.kill(&filter("LADDR 127.0.0.1:6380"), 9), (1, false));
        // Delivered even though nobody was waiting yet.
        assert_eq!(killed3.try_recv(), Ok(()));
        drop((e3, e4));
        assert_eq!(d.kill(&filter("ID 3"), 9), (0, false));
    }

    #[test]
    fn the_caller_is_spared_unless_skipme_no_and_never_signalled() {
        let d = Arc::new(Directory::default());
        let (_e, mut killed) = d.enroll(3, &peer(1003, 6380, 8));
        assert_eq!(d.kill(&filter("ADDR 127.0.0.1:1003"), 3), (0, false));
        assert_eq!(
            d.kill(&filter("ADDR 127.0.0.1:1003 SKIPME no"), 3),
            (1, true)
        );
        // The caller closes itself, after its reply.
        assert!(killed.try_recv().is_err());
        let (_e4, _) = d.enroll(4, &peer(1004, 6380, 9));
        let (f, form) = KillFilter::parse(&[Bytes::from_static(b"127.0.0.1:1004")], |u| {
            u == b"default"
        })
        .expect("the old form");
        assert_eq!(form, KillForm::Old);
        assert_eq!(d.kill(&f, 4), (1, true), "the old form spares no one");
    }

    /// Two clients killing everyone at once: each client is counted once,
    /// by whichever kill came first.
    #[test]
    fn a_client_already_killed_is_not_counted_again() {
        let d = Arc::new(Directory::default());
        let (_a, _) = d.enroll(1, &peer(1001, 6380, 8));
        let (_b, mut b_killed) = d.enroll(2, &peer(1002, 6380, 9));
        let everyone = filter("TYPE normal SKIPME no");
        assert_eq!(d.kill(&everyone, 1), (2, true));
        assert_eq!(b_killed.try_recv(), Ok(()));
        assert_eq!(d.kill(&everyone, 2), (0, false), "both were killed already");
    }

    #[test]
    fn bad_filters_get_redis_errors_in_argument_order() {
        let err = |args: &[&str]| {
            let args: Vec<Bytes> = args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            KillFilter::parse(&args, |u| u == b"default").expect_err("a bad filter")
        };
        assert_eq!(err(&["TYPE", "x", "ADDR"]), "ERR Unknown client type 'x'");
        assert_eq!(err(&["ADDR", "a", "TYPE"]), "ERR syntax error");
        assert_eq!(err(&["ID", "-1"]), "ERR client-id should be greater than 0");
        assert_eq!(err(&["USER", "bob"]), "ERR No such user 'bob'");
        assert_eq!(err(&["SKIPME", "maybe"]), "ERR syntax error");
        assert_eq!(err(&["MAXAGE", "5"]), "ERR syntax error");
        assert_eq!(
            filter("USER default").user.as_deref(),
            Some(&b"default"[..])
        );
    }

    #[test]
    fn a_listing_lasts_as_long_as_the_pin_and_no_longer() {
        let d = Arc::new(Directory::default());
        let first = d.list(7, 100);
        assert_eq!(d.redis_id(7), Some(100));
        assert_eq!(d.redis_id(8), None);
        // Re-pinned: the new connection replaces the old one, and the old
        // listing going away afterwards leaves the new one in place.
        let second = d.list(7, 200);
        drop(first);
        assert_eq!(d.redis_id(7), Some(200));
        drop(second);
        assert_eq!(d.redis_id(7), None);
    }
}
