//! `ingressd`: wiring only — parse the command line and configuration, start logging, run.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use ingress_daemon::cli::{Cli, Command};
use ingress_daemon::config::{Config, EXIT_CONFIG};
use ingress_daemon::{ctl, daemon, listeners};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        return match ctl::run(args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config_error = |e: ingress_daemon::config::ConfigError| {
        eprintln!("ingressd: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    };
    let config = match Config::load(&cli.sources()) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let token = match config.validate() {
        Ok(t) => t,
        Err(e) => return config_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (api, shared) = match daemon::bind_api(config) {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("ingressd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ingressd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parts = daemon::Parts {
        shared,
        token,
        // The data path installs its handler here; until then listeners accept and close.
        handler: Arc::new(listeners::ClosingHandler),
        probes: Vec::new(),
    };
    let served = runtime.block_on(async {
        let shutdown = daemon::shutdown_signal().map_err(daemon::DaemonError::Signals)?;
        daemon::run(api, parts, shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "daemon failed");
            eprintln!("ingressd: {e}");
            ExitCode::FAILURE
        }
    }
}
