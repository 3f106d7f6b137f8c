//! TLS on both sides (rustls, ring only): building the client configuration
//! for `rediss://` upstreams and the server configuration for `[server.tls]`
//! from PEM files, and [`MaybeTls`], the one stream type sessions and
//! upstream connections run on whether or not TLS is in use.
//!
//! Every error names the configuration field and the file it came from, so a
//! bad path or certificate is a start-up (or refused reload) error that says
//! what to fix, never a handshake that fails later for no stated reason.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{ClientAuth, ServerTlsConfig, UpstreamTlsConfig};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{field}: {path}: {message}")]
    File {
        /// The configuration field naming the file (`server.tls.cert_file`).
        field: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The settings do not fit together (rustls refused them).
    #[error("{field}: {message}")]
    Setting {
        /// The configuration field to change.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl TlsError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::File { field, .. } | TlsError::Setting { field, .. } => field,
        }
    }

    /// The message without the field (for a `FieldError`, which adds it).
    pub fn detail(&self) -> String {
        match self {
            TlsError::File { path, message, .. } => format!("{path}: {message}"),
            TlsError::Setting { message, .. } => message.clone(),
        }
    }
}

/// Installs ring as the process's crypto provider. With one backend compiled
/// in this only matters to code that asks for the process default (rustls's
/// plain `builder()`, the NATS client); nearcache's own configurations name
/// ring explicitly. Calling it twice is harmless.
pub fn install_default_provider() {
    // Err means a provider is installed already: the same one, or one a host
    // program chose; either way there is nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM file, at least one.
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::File {
        field,
        path: path.display().to_string(),
        message,
    };
    // (metadata first: a missing file's pem error would not say "not found".)
    std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |message: String| TlsError::File {
        field,
        path: path.display().to_string(),
        message,
    };
    std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(format!("no usable PEM private key: {e}")))
}

/// A root store of the certificates in `path`.
fn roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(field, path)? {
        store.add(cert).map_err(|e| TlsError::File {
            field,
            path: path.display().to_string(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// The operating system's trust roots, for a `rediss://` upstream with no
/// `ca_file` (managed services with publicly trusted certificates).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::Setting {
            field: "upstream.tls.ca_file",
            message: "not set, and the system has no trusted CA certificates: set it".into(),
        });
    }
    Ok(store)
}

/// How upstream connections make TLS: the client configuration and the name
/// the server's certificate must carry. Compared by identity, as a
/// configuration built twice from the same files is still "the same".
#[derive(Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for UpstreamTls {}

impl UpstreamTls {
    /// Builds from `[upstream.tls]`; `host` (the URL's) is the server name
    /// unless `server_name` is set.
    pub fn new(cfg: &UpstreamTlsConfig, host: &str) -> Result<Self, TlsError> {
        let name = cfg.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| TlsError::Setting {
            field: "upstream.tls.server_name",
            message: format!("'{name}' is not a DNS name or IP address: {e}"),
        })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setting {
                field: "upstream.tls",
                message: e.to_string(),
            })?;
        let builder = if cfg.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            let store = match &cfg.ca_file {
                Some(path) => roots("upstream.tls.ca_file", path)?,
                None => system_roots()?,
            };
            builder.with_root_certificates(store)
        };
        let config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    certificates("upstream.tls.cert_file", cert)?,
                    private_key("upstream.tls.key_file", key)?,
                )
                .map_err(|e| TlsError::File {
                    field: "upstream.tls.key_file",
                    path: key.display().to_string(),
                    message: format!("does not fit upstream.tls.cert_file: {e}"),
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Setting {
                    field: "upstream.tls.cert_file",
                    message: "cert_file and key_file go together: set both or neither".into(),
                });
            }
        };
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// Makes TLS over an open TCP stream to Redis.
    pub async fn connect<T>(&self, stream: T) -> io::Result<MaybeTls<T>>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector.connect(self.server_name.clone(), stream).await?;
        Ok(MaybeTls::Client(Box::new(tls)))
    }
}

/// Accepts every server certificate: `upstream.tls.insecure_skip_verify`,
/// for tests against self-signed servers only. Signatures are still checked,
/// so the handshake itself is sound; who is on the other end is not.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the client-facing configuration from `[server.tls]`, reading the
/// files now (at start, and again on every reload so certificates rotate).
pub fn server_config(cfg: &ServerTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates("server.tls.cert_file", &cfg.cert_file)?;
    let key = private_key("server.tls.key_file", &cfg.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setting {
            field: "server.tls",
            message: e.to_string(),
        })?;
    let builder = match &cfg.client_ca_file {
        Some(path) => {
            let store = Arc::new(roots("server.tls.client_ca_file", path)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(store, provider());
            let verifier = match cfg.client_auth() {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| TlsError::File {
                field: "server.tls.client_ca_file",
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::File {
            field: "server.tls.key_file",
            path: cfg.key_file.display().to_string(),
            message: format!("does not fit server.tls.cert_file: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// A byte stream that is plain TCP or TLS over it, on either side: sessions
/// and upstream connections are generic over the stream, and one type keeps
/// them compiled once.
#[derive(Debug)]
pub enum MaybeTls<T> {
    /// No TLS.
    Plain(T),
    /// nearcache is the TLS client (to Redis).
    Client(Box<tokio_rustls::client::TlsStream<T>>),
    /// nearcache is the TLS server (to a client).
    Server(Box<tokio_rustls::server::TlsStream<T>>),
}

impl<T> MaybeTls<T> {
    /// The stream TLS runs over (for its addresses).
    pub fn get_ref(&self) -> &T {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Client(s) => s.get_ref().0,
            MaybeTls::Server(s) => s.get_ref().0,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Client(s) => s.is_write_vectored(),
            MaybeTls::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors name the field to change and the file they are about, so a
    /// start-up error says what to fix.
    #[test]
    fn errors_name_the_field_and_the_file() {
        let missing = UpstreamTlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..UpstreamTlsConfig::default()
        };
        let e = UpstreamTls::new(&missing, "redis.example").expect_err("refused");
        assert_eq!(e.field(), "upstream.tls.ca_file");
        assert!(
            e.to_string()
                .starts_with("upstream.tls.ca_file: /nonexistent/ca.pem: cannot read"),
            "{e}"
        );

        let half = UpstreamTlsConfig {
            cert_file: Some("/nonexistent/c.pem".into()),
            insecure_skip_verify: true,
            ..UpstreamTlsConfig::default()
        };
        let e = UpstreamTls::new(&half, "redis.example").expect_err("refused");
        assert_eq!(e.field(), "upstream.tls.cert_file");

        let bad_name = UpstreamTlsConfig {
            insecure_skip_verify: true,
            server_name: Some("not a name!".into()),
            ..UpstreamTlsConfig::default()
        };
        let e = UpstreamTls::new(&bad_name, "h").expect_err("refused");
        assert_eq!(e.field(), "upstream.tls.server_name");

        let dir = tempfile::tempdir().expect("a temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").expect("write");
        let server = ServerTlsConfig {
            cert_file: empty.clone(),
            key_file: empty,
            client_ca_file: None,
            client_auth: None,
            handshake_timeout: crate::config::Duration::default(),
        };
        let e = server_config(&server).expect_err("refused");
        assert_eq!(e.field(), "server.tls.cert_file");
        assert!(
            e.detail().contains("empty.pem: holds no PEM certificate"),
            "{e}"
        );
    }

    /// Plain streams pass bytes through untouched, in both directions.
    #[tokio::test]
    async fn a_plain_stream_is_the_stream_itself() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64);
        let (mut a, mut b) = (MaybeTls::Plain(a), MaybeTls::Plain(b));
        a.write_all(b"PING\r\n").await.expect("write");
        let mut buf = [0u8; 6];
        b.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"PING\r\n");
    }
}
