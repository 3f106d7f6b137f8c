//! The `nearcache` binary: parse flags, load and validate the configuration,
//! run the proxy until SIGTERM/SIGINT, then shut down gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nearcache::config::{Config, Overrides};
use nearcache::reload::Source;

/// A Redis-protocol caching proxy.
#[derive(Debug, Parser)]
#[command(name = "nearcache", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, defaults apply.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Address to accept clients on [env: NEARCACHE_LISTEN] (default 127.0.0.1:6380).
    #[arg(long)]
    listen: Option<String>,
    /// Upstream Redis, redis://[user:pass@]host:port[/db] [env: NEARCACHE_UPSTREAM, REDIS_URL].
    #[arg(long)]
    upstream: Option<String>,
    /// Address for the admin HTTP endpoints: /metrics, /healthz, /readyz, /stats [env: NEARCACHE_ADMIN].
    #[arg(long)]
    admin: Option<String>,
    /// NATS URL for the invalidation bus [env: NATS_URL].
    #[arg(long)]
    nats: Option<String>,
    /// This instance's id on the bus [env: NEARCACHE_INSTANCE_ID].
    #[arg(long)]
    instance_id: Option<String>,
    /// Log lines for people (`human`, the default) or one JSON object per
    /// line (`json`) [env: NEARCACHE_LOG_FORMAT].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and exit (non-zero, naming the field, if invalid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Read a password from stdin (one line) and print its SHA-256 hex, for a
    /// `[[users]]` entry's `passwords`.
    HashPassword,
}

fn main() -> ExitCode {
    // One crypto backend (ring) for the process, before anything makes TLS.
    nearcache::tls::install_default_provider();
    let cli = Cli::parse();
    let format = match (cli.log_format, std::env::var("NEARCACHE_LOG_FORMAT")) {
        (Some(f), _) => f,
        (None, Ok(v)) => match <LogFormat as clap::ValueEnum>::from_str(&v, true) {
            Ok(f) => f,
            Err(_) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("nearcache: NEARCACHE_LOG_FORMAT: '{v}' is not human or json");
                }
                return ExitCode::FAILURE;
            }
        },
        (None, Err(_)) => LogFormat::Human,
    };
    init_logging(format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("nearcache: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `NEARCACHE_LOG`; colours only on a
/// terminal (a file or a collector gets plain text).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    // async-nats logs every failed reconnect attempt at INFO during an
    // outage (the bus reports the outage itself, once, at WARN), and its
    // DEBUG lines print the server URL with its password: it stays at WARN
    // unless NEARCACHE_LOG names it.
    let wanted = std::env::var("NEARCACHE_LOG").unwrap_or_else(|_| "info".into());
    let directives = if wanted.contains("async_nats") {
        wanted
    } else {
        format!("{wanted},async_nats=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::HashPassword) = &cli.command {
        return hash_password();
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        let cfg = Config::from_file(file)?;
        cfg.validate(&file.display().to_string())?;
        #[allow(clippy::print_stdout)]
        {
            println!("{}: ok", file.display());
        }
        return Ok(());
    }
    let (mut cfg, origin) = match &cli.config {
        Some(path) => (Config::from_file(path)?, path.display().to_string()),
        None => (Config::default(), "defaults".to_owned()),
    };
    let flags = Overrides {
        listen: cli.listen,
        upstream: cli.upstream,
        admin: cli.admin,
        nats: cli.nats,
        instance_id: cli.instance_id,
    };
    let overrides = Overrides::from_env().then(flags);
    cfg.apply(overrides.clone());
    let source = cli.config.clone().map(|path| Source { path, overrides });
    cfg.validate(&format!("{origin} (with environment and flags)"))?;

    // One thread: everything on the main thread, with no cross-thread
    // wake-ups at all (the cheapest per request where cores are scarce).
    let mut builder = if cfg.server.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cfg.server.threads > 1 {
        builder.worker_threads(cfg.server.threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // Before starting: a signal that comes while the upstream is
        // connected is handled too, not fatal.
        let signals = Signals::install()?;
        let proxy = nearcache::Proxy::start_from(cfg, source).await?;
        signals.serve_until_stopped(&proxy).await;
        tracing::info!("shutting down: finishing in-flight requests");
        proxy.shutdown().await;
        tracing::info!("bye");
        anyhow::Ok(())
    })
}

/// The signals nearcache handles: SIGTERM and SIGINT stop it (logged),
/// SIGHUP reloads the configuration file.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Runs until SIGTERM or SIGINT; each SIGHUP reloads.
    async fn serve_until_stopped(mut self, proxy: &nearcache::Proxy) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return tracing::info!("SIGTERM"),
                _ = self.int.recv() => return tracing::info!("SIGINT"),
                _ = self.hup.recv() => {
                    // Logged by the reload itself, whatever it did.
                    let _ = proxy.reload("SIGHUP").await;
                }
            }
        }
    }
}

/// `nearcache hash-password`: the password never appears in argv (where
/// `ps` and shell history would show it), only on stdin.
fn hash_password() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("no password on stdin (echo -n 'secret' | nearcache hash-password)");
    }
    #[allow(clippy::print_stdout)]
    {
        println!("{}", nearcache::acl::hash_password(password.as_bytes()));
    }
    Ok(())
}
