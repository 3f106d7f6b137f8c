//! TLS on both sides, with real processes and certificates the test makes
//! with `openssl`: nearcache to a `redis-server --tls-port` upstream
//! (verified by a CA, with and without a client certificate, and with
//! verification skipped against a self-signed server), and clients to
//! nearcache over TLS (the redis crate in RESP2 and RESP3, `redis-cli
//! --tls`, client certificates). A wrong CA, an expired certificate and a
//! plain-text client on the TLS port each fail cleanly and harm no other
//! client; a certificate rotated by reload keeps the open connections and
//! is what new ones see.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nearcache::Config;
use nearcache::config::{ClientAuth, ServerTlsConfig};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::support::{
    ProxyProcess, TestProxy, UPSTREAM_CONNECT_FAILED, free_port, http_get, redis_cli, wait_until,
};

const LIMIT: Duration = Duration::from_secs(10);

/// A CA, a second (wrong) CA, leaves it signed for 127.0.0.1/localhost
/// (server, server2 for rotation, client, an expired one), a client leaf of
/// the wrong CA and a self-signed leaf, in a temp dir.
pub(crate) struct Certs {
    dir: tempfile::TempDir,
}

const MAKE_CERTS: &str = r#"
set -e
key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"; }
ca() {
  key "$1"
  openssl req -x509 -new -key "$1.key" -out "$1.crt" -days 30 -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
ext() {
  printf 'basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > leaf.ext
}
# leaf NAME CA DAYS: -days -1 makes a certificate that expired a day ago.
leaf() {
  key "$1"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$1"
  ext
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial \
    -out "$1.crt" -days "$3" -extfile leaf.ext
}
ca ca
ca wrongca
leaf server ca 30
leaf server2 ca 30
leaf client ca 30
leaf expired ca -1
leaf wrongclient wrongca 30
key selfsigned
ext
openssl req -x509 -new -key selfsigned.key -out selfsigned.crt -days 30 -subj "/CN=selfsigned" \
  -addext basicConstraints=CA:FALSE -addext subjectAltName=IP:127.0.0.1
"#;

impl Certs {
    pub(crate) fn make() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(MAKE_CERTS)
            .current_dir(dir.path())
            .output()
            .expect("sh and openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "making certificates failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Certs { dir }
    }

    /// redis-server's options for a TLS port `port` with the server leaf
    /// (clients need not show a certificate).
    pub(crate) fn redis_tls_args(&self, port: u16) -> Vec<String> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(self.crt("server")),
            "--tls-key-file".into(),
            path(self.key("server")),
            "--tls-ca-cert-file".into(),
            path(self.crt("ca")),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }

    /// A TLS client connector trusting the CA, for raw connections.
    pub(crate) fn client(&self) -> nearcache::tls::UpstreamTls {
        let cfg = nearcache::config::UpstreamTlsConfig {
            ca_file: Some(self.crt("ca")),
            ..Default::default()
        };
        nearcache::tls::UpstreamTls::new(&cfg, "127.0.0.1").unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn crt(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.crt"))
    }

    pub(crate) fn key(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.key"))
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

/// A redis-server speaking only TLS (`--port 0 --tls-port P`), killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    /// `leaf` is the server's certificate; `auth_clients`: Redis's
    /// `tls-auth-clients` (whether nearcache must show a certificate).
    fn start(certs: &Certs, leaf: &str, auth_clients: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(certs.crt(leaf))
            .arg("--tls-key-file")
            .arg(certs.key(leaf))
            .arg("--tls-ca-cert-file")
            .arg(certs.crt("ca"))
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        // Listening is all we need to know; TLS itself is what is tested.
        wait_until("redis-server's TLS port", LIMIT, || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        TlsRedis {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nearcache in front of a plain upstream is not what these tests are
/// about, so the upstream side is a plain redis-server unless a test says.
fn plain_upstream() -> crate::support::RedisServer {
    crate::support::RedisServer::start()
}

pub(crate) fn server_tls(certs: &Certs, leaf: &str) -> ServerTlsConfig {
    ServerTlsConfig {
        cert_file: certs.crt(leaf),
        key_file: certs.key(leaf),
        client_ca_file: None,
        client_auth: None,
        handshake_timeout: nearcache::config::Duration(LIMIT),
    }
}

/// A redis-crate client for `rediss://addr` trusting `ca` (and showing
/// `client`'s certificate, if given).
fn tls_client(
    addr: SocketAddr,
    certs: &Certs,
    ca: &str,
    client: Option<&str>,
    resp3: bool,
) -> redis::Client {
    let query = if resp3 { "?protocol=resp3" } else { "" };
    redis::Client::build_with_tls(
        format!("rediss://{addr}/{query}"),
        redis::TlsCertificates {
            client_tls: client.map(|name| redis::ClientTlsConfig {
                client_cert: certs.read(&format!("{name}.crt")),
                client_key: certs.read(&format!("{name}.key")),
            }),
            root_cert: Some(certs.read(&format!("{ca}.crt"))),
        },
    )
    .unwrap()
}

/// Connects and runs a PING, bounded: what any client does first.
async fn ping(client: &redis::Client) -> redis::RedisResult<String> {
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    tokio::time::timeout(LIMIT, attempt)
        .await
        .unwrap_or_else(|_| panic!("a TLS connection neither worked nor failed within {LIMIT:?}"))
}

async fn set_get(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
    let got: String = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    assert_eq!(got, value);
}

/// The certificate a TLS server at `addr` shows, read with rustls itself
/// (the redis crate does not expose it), trusting `ca`.
async fn presented_certificate(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    session.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem_file: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_file).unwrap().to_vec()
}

/// A test's handshake counters from `/metrics`.
fn handshakes(admin: SocketAddr, outcome: &str) -> u64 {
    let (status, body) = http_get(admin, "/metrics", "");
    assert_eq!(status, 200, "{body}");
    let prefix = format!("nearcache_tls_handshakes_total{{outcome=\"{outcome}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_upstream_verified_by_its_ca_serves_reads_writes_and_tracking() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = TlsRedis::start(&certs, "server", false);
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.upstream.url = redis.url();
    cfg.upstream.tls.ca_file = Some(certs.crt("ca"));
    // Redis's own invalidations come over a tracking connection of its own:
    // TLS too.
    cfg.cache.rules = vec![nearcache::config::RuleConfig::caching(
        "tls:cached:",
        Duration::from_secs(60),
    )];
    cfg.coherence.redis_tracking = true;
    let proxy = TestProxy::start_with(cfg).await;
    proxy.wait_for_log("redis tracking enabled", LIMIT).await;
    let mut conn = proxy.conn().await;
    set_get(&mut conn, "tls:plain-client", "over rediss").await;

    // Cached (the second read is an L1 hit), then written behind
    // nearcache's back: tracking's invalidation must reach L1 long before
    // the rule's 60 s.
    let redis_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, redis.port));
    let mut direct = tls_client(redis_addr, &certs, "ca", None, false)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg("tls:cached:k")
        .arg("old")
        .query_async(&mut direct)
        .await
        .unwrap();
    for _ in 0..2 {
        let v: String = redis::cmd("GET")
            .arg("tls:cached:k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(v, "old");
    }
    let info: String = redis::cmd("INFO")
        .arg("nearcache")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        info.lines().any(|l| l
            .strip_prefix("nearcache_l1_hits:")
            .is_some_and(|n| n.trim() != "0")),
        "the second read was not an L1 hit: {info}"
    );
    let () = redis::cmd("SET")
        .arg("tls:cached:k")
        .arg("new")
        .query_async(&mut direct)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let v: String = redis::cmd("GET")
            .arg("tls:cached:k")
            .query_async(&mut conn)
            .await
            .unwrap();
        if v == "new" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "L1 still serves the old value"
        );
        tokio::task::yield_now().await;
    }
    // RESP3 clients get their own pool: another handshake, same settings.
    let mut conn3 = proxy
        .client_resp3()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    set_get(&mut conn3, "tls:resp3", "also").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_verifies_its_clients_accepts_nearcache_s_certificate() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = TlsRedis::start(&certs, "server", true);
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.upstream.url = redis.url();
    cfg.upstream.tls.ca_file = Some(certs.crt("ca"));
    cfg.upstream.tls.cert_file = Some(certs.crt("client"));
    cfg.upstream.tls.key_file = Some(certs.key("client"));
    // The name the certificate carries, not the address dialled.
    cfg.upstream.url = format!("rediss://127.0.0.1:{}", redis.port);
    cfg.upstream.tls.server_name = Some("localhost".into());
    let proxy = TestProxy::start_with(cfg).await;
    let mut conn = proxy.conn().await;
    set_get(&mut conn, "tls:mutual", "both sides show certificates").await;
    // A MULTI runs on a dedicated connection: its own handshake.
    let (a, b): (String, String) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("tls:tx")
        .arg("1")
        .cmd("GET")
        .arg("tls:tx")
        .query_async::<(String, String)>(&mut conn)
        .await
        .unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("OK", "1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_reaches_a_self_signed_redis_and_a_wrong_ca_does_not() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = TlsRedis::start(&certs, "selfsigned", false);

    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.upstream.url = redis.url();
    cfg.upstream.tls.insecure_skip_verify = true;
    let proxy = TestProxy::start_with(cfg.clone()).await;
    proxy.must_log("insecure_skip_verify = true");
    let mut conn = proxy.conn().await;
    set_get(&mut conn, "tls:insecure", "unverified").await;
    drop(conn);
    proxy.shutdown().await;

    // Verified against a CA that did not sign it: no connection, and the
    // client is told so (not served in clear text, not hung).
    cfg.upstream.tls.insecure_skip_verify = false;
    cfg.upstream.tls.ca_file = Some(certs.crt("wrongca"));
    let proxy = TestProxy::start_with(cfg).await;
    proxy
        .expect_log(UPSTREAM_CONNECT_FAILED)
        .expect_log("TLS handshake with");
    let mut conn = proxy.conn().await;
    let refused = redis::cmd("GET")
        .arg("tls:insecure")
        .query_async::<Option<String>>(&mut conn)
        .await
        .expect_err("an unverifiable upstream is not used");
    assert!(
        refused.to_string().contains("upstream unavailable"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_with_the_redis_crate_in_resp2_and_resp3_and_with_redis_cli() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = plain_upstream();
    let mut cfg = crate::support::config_for(&redis);
    cfg.server.tls = Some(server_tls(&certs, "server"));
    let proxy = TestProxy::start_with(cfg).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));
    for resp3 in [false, true] {
        let client = tls_client(addr, &certs, "ca", None, resp3);
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        set_get(&mut conn, &format!("tls:client:{resp3}"), "secret").await;
    }
    let out = redis_cli(
        proxy.port(),
        &[
            "--tls",
            "--cacert",
            certs.crt("ca").to_str().unwrap(),
            "GET",
            "tls:client:true",
        ],
        None,
    );
    assert_eq!(out.trim(), "secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_an_expired_certificate_and_plain_text_fail_cleanly_and_harm_no_other_client() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = plain_upstream();
    let mut cfg = crate::support::config_for(&redis);
    cfg.server.tls = Some(server_tls(&certs, "server"));
    cfg.admin.listen = "127.0.0.1:0".into();
    let proxy = TestProxy::start_with(cfg.clone()).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));

    // A client already connected keeps working through all of it.
    let good = tls_client(addr, &certs, "ca", None, false);
    let mut conn = good.get_multiplexed_async_connection().await.unwrap();
    set_get(&mut conn, "tls:survivor", "1").await;

    // A client that trusts another CA refuses nearcache's certificate.
    let wrong = ping(&tls_client(addr, &certs, "wrongca", None, false)).await;
    assert!(wrong.is_err(), "a client trusting the wrong CA connected");

    // A plain-text client on the TLS port is disconnected, unanswered.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(LIMIT)).unwrap();
    plain.write_all(b"PING\r\n").unwrap();
    let mut got = Vec::new();
    // EOF (or a reset) ends the read: the connection is closed.
    let _ = plain.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("PONG"),
        "a plain-text client was answered on the TLS port: {got:?}"
    );
    proxy
        .wait_for_log("TLS handshake failed; client disconnected", LIMIT)
        .await;
    assert!(handshakes(proxy.admin_addr(), "failed") >= 2);
    assert!(handshakes(proxy.admin_addr(), "ok") >= 1);

    set_get(&mut conn, "tls:survivor", "2").await;
    assert_eq!(ping(&good).await.unwrap(), "PONG");
    drop(conn);
    proxy.shutdown().await;

    // A server certificate that has expired is refused by the client.
    cfg.server.tls = Some(server_tls(&certs, "expired"));
    let expired = TestProxy::start_with(cfg).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, expired.port()));
    let err = ping(&tls_client(addr, &certs, "ca", None, false))
        .await
        .expect_err("an expired certificate is accepted");
    assert!(
        err.to_string().to_lowercase().contains("expired"),
        "the error says why: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = plain_upstream();
    let mut cfg = crate::support::config_for(&redis);
    let mut tls = server_tls(&certs, "server");
    tls.client_ca_file = Some(certs.crt("ca"));
    cfg.server.tls = Some(tls.clone());
    let proxy = TestProxy::start_with(cfg.clone()).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));

    let signed = tls_client(addr, &certs, "ca", Some("client"), true);
    let mut conn = signed.get_multiplexed_async_connection().await.unwrap();
    set_get(&mut conn, "tls:mtls", "ok").await;
    assert!(
        ping(&tls_client(addr, &certs, "ca", None, false))
            .await
            .is_err()
    );
    assert!(
        ping(&tls_client(addr, &certs, "ca", Some("wrongclient"), false))
            .await
            .is_err()
    );
    set_get(&mut conn, "tls:mtls", "still").await;
    drop(conn);
    proxy.shutdown().await;

    // optional: no certificate is let in; a certificate shown must verify.
    tls.client_auth = Some(ClientAuth::Optional);
    cfg.server.tls = Some(tls);
    let proxy = TestProxy::start_with(cfg).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));
    assert_eq!(
        ping(&tls_client(addr, &certs, "ca", None, false))
            .await
            .unwrap(),
        "PONG"
    );
    assert!(
        ping(&tls_client(addr, &certs, "ca", Some("wrongclient"), false))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_certificate_keeping_open_connections() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = plain_upstream();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(certs.crt("server"), &cert).unwrap();
    std::fs::copy(certs.key("server"), &key).unwrap();
    let tls_port = free_port();
    let config = live.path().join("nearcache.toml");
    let text = format!(
        "[upstream]\nurl = \"{}\"\n[server]\ntls_listen = \"127.0.0.1:{tls_port}\"\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        redis.url(),
        cert.display(),
        key.display()
    );
    std::fs::write(&config, &text).unwrap();
    // The built binary: the provider installed by main, a file to reload.
    let proxy = ProxyProcess::start_args(&["--config", config.to_str().unwrap()]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port));
    wait_until("the TLS listener", LIMIT, || {
        TcpStream::connect(addr).is_ok()
    });
    assert!(
        presented_certificate(addr, &certs.crt("ca")).await == der_of(&certs.crt("server")),
        "the TLS listener does not show server.crt"
    );
    let client = tls_client(addr, &certs, "ca", None, false);
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    set_get(&mut conn, "tls:rotate", "before").await;

    // Rotate: new files in place, then PROXY RELOAD over the plain listener.
    std::fs::copy(certs.crt("server2"), &cert).unwrap();
    std::fs::copy(certs.key("server2"), &key).unwrap();
    let out = redis_cli(proxy.port(), &["PROXY", "RELOAD"], None);
    // Nothing about the rotation takes a restart.
    assert!(out.contains("OK") && !out.contains("restart"), "{out}");
    set_get(&mut conn, "tls:rotate", "after, same connection").await;
    assert!(
        presented_certificate(addr, &certs.crt("ca")).await == der_of(&certs.crt("server2")),
        "the TLS listener does not show server2.crt"
    );

    // A broken key is refused like any broken reload: the old pair stays.
    std::fs::write(&key, "not a key").unwrap();
    proxy.expect_log("configuration not reloaded");
    let out = redis_cli(proxy.port(), &["PROXY", "RELOAD"], None);
    assert!(
        out.contains("server.tls.key_file") && out.contains("tls.key"),
        "{out}"
    );
    assert!(
        presented_certificate(addr, &certs.crt("ca")).await == der_of(&certs.crt("server2")),
        "the TLS listener does not show server2.crt"
    );

    // redis-cli over TLS, to the second listener of the binary.
    let out = redis_cli(
        tls_port,
        &[
            "--tls",
            "--cacert",
            certs.crt("ca").to_str().unwrap(),
            "GET",
            "tls:rotate",
        ],
        None,
    );
    assert_eq!(out.trim(), "after, same connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_path_is_a_start_up_error_naming_the_field_and_the_file() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    let mut tls = server_tls(&certs, "server");
    tls.cert_file = PathBuf::from("/nonexistent/server.crt");
    cfg.server.tls = Some(tls);
    cfg.upstream.url = "rediss://127.0.0.1:1".into();
    cfg.upstream.tls.ca_file = Some(certs.path("missing-ca.crt"));
    let err = nearcache::Proxy::start(cfg.clone())
        .await
        .expect_err("a missing certificate file starts nothing")
        .to_string();
    assert!(
        err.contains("server.tls.cert_file: /nonexistent/server.crt"),
        "{err}"
    );
    assert!(
        err.contains("upstream.tls.ca_file") && err.contains("missing-ca.crt"),
        "{err}"
    );

    // A key that is not one, and a client certificate without its key.
    let mut tls = server_tls(&certs, "server");
    tls.key_file = certs.crt("server");
    cfg.server.tls = Some(tls);
    cfg.upstream.tls.ca_file = Some(certs.crt("ca"));
    cfg.upstream.tls.cert_file = Some(certs.crt("client"));
    let err = cfg.validate("t.toml").unwrap_err().to_string();
    assert!(
        err.contains("server.tls.key_file") && err.contains("server.crt"),
        "{err}"
    );
    assert!(
        err.contains("upstream.tls.cert_file: cert_file and key_file go together"),
        "{err}"
    );

    // The binary's check-config says the same.
    let file = certs.path("broken.toml");
    std::fs::write(
        &file,
        "[server.tls]\ncert_file = \"/nonexistent/server.crt\"\nkey_file = \"/nonexistent/server.key\"\n",
    )
    .unwrap();
    let out = Command::new(ProxyProcess::binary())
        .args(["check-config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("server.tls.cert_file") && text.contains("/nonexistent/server.crt"),
        "{text}"
    );
}

#[test]
fn protected_mode_counts_required_client_certificates_as_a_guard() {
    let certs = Certs::make();
    let exposed = |tls: Option<ServerTlsConfig>, tls_listen: &str| {
        let mut cfg = Config::default();
        cfg.server.listen = "0.0.0.0:6380".into();
        cfg.server.tls_listen = tls_listen.into();
        cfg.server.tls = tls;
        cfg.validate("t.toml").err().map(|e| e.to_string())
    };
    let mut mutual = server_tls(&certs, "server");
    mutual.client_ca_file = Some(certs.crt("ca"));
    // TLS on the main listener with client certificates required: guarded.
    assert_eq!(exposed(Some(mutual.clone()), ""), None);
    // TLS alone proves nothing about who connects.
    let err = exposed(Some(server_tls(&certs, "server")), "").expect("refused");
    assert!(
        err.contains("server.listen") && err.contains("protected mode"),
        "{err}"
    );
    // optional client certificates let anyone in.
    let mut optional = mutual.clone();
    optional.client_auth = Some(ClientAuth::Optional);
    assert!(exposed(Some(optional), "").is_some());
    // A second, TLS, listener guards only itself: the plain one is exposed.
    let err = exposed(Some(mutual.clone()), "0.0.0.0:6381").expect("refused");
    assert!(
        err.contains("server.listen:") && !err.contains("server.tls_listen:"),
        "{err}"
    );
    // tls_listen needs [server.tls]; client_auth needs a client CA.
    let mut cfg = Config::default();
    cfg.server.tls_listen = "127.0.0.1:6381".into();
    let err = cfg.validate("t.toml").unwrap_err().to_string();
    assert!(
        err.contains("server.tls_listen: needs [server.tls]"),
        "{err}"
    );
    let mut no_ca = server_tls(&certs, "server");
    no_ca.client_auth = Some(ClientAuth::Required);
    cfg.server.tls = Some(no_ca);
    let err = cfg.validate("t.toml").unwrap_err().to_string();
    assert!(
        err.contains("server.tls.client_auth: needs server.tls.client_ca_file"),
        "{err}"
    );
    // TLS settings for a plain upstream URL are a mistake, said so.
    let mut cfg = Config::default();
    cfg.upstream.tls.ca_file = Some(certs.crt("ca"));
    let err = cfg.validate("t.toml").unwrap_err().to_string();
    assert!(
        err.contains("upstream.tls: is set but upstream.url is redis://"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_disconnected_after_handshake_timeout() {
    nearcache::tls::install_default_provider();
    let certs = Certs::make();
    let redis = plain_upstream();
    let mut cfg = crate::support::config_for(&redis);
    let mut tls = server_tls(&certs, "server");
    tls.handshake_timeout = nearcache::config::Duration(Duration::from_millis(200));
    cfg.server.tls = Some(tls);
    cfg.admin.listen = "127.0.0.1:0".into();
    let proxy = TestProxy::start_with(cfg).await;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));
    // Connected, silent: it holds no one else up while it waits.
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!(
        ping(&tls_client(addr, &certs, "ca", None, false))
            .await
            .unwrap(),
        "PONG"
    );
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = silent.read_to_end(&mut got);
    assert!(
        started.elapsed() < LIMIT,
        "the silent client was not disconnected"
    );
    proxy
        .wait_for_log("TLS handshake timed out; client disconnected", LIMIT)
        .await;
    assert_eq!(handshakes(proxy.admin_addr(), "timeout"), 1);
}
