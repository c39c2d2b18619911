//! `ingressd`: wiring only — parse the command line and configuration, start logging, run.
use std::process::ExitCode;
use std::sync::Arc;

use ingress_daemon::access_log::AccessLog;
use ingress_daemon::cli::{Cli, Command};
use ingress_daemon::config::{Config, EXIT_CONFIG};
use ingress_daemon::{ctl, daemon, metrics, notify, proxy, splice};

/// How long live flows may run on after a shutdown signal before they are reset.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the access log may take to write its last lines at exit.
const LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// The splice engine's settings from the configuration.
fn engine_config(config: &Config) -> splice::EngineConfig {
    splice::EngineConfig {
        offload: match config.offload {
            ingress_daemon::config::Offload::Auto => splice::Offload::Auto,
            ingress_daemon::config::Offload::Off => splice::Offload::Off,
            ingress_daemon::config::Offload::Required => splice::Offload::Required,
        },
        soft_water_bytes: config.soft_water_bytes,
        high_water_bytes: config.high_water_bytes,
        low_water_bytes: config.low_water_bytes,
        ..splice::EngineConfig::default()
    }
}

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(rejected) => {
            if rejected.to_stdout {
                print!("{}", rejected.text);
            } else {
                eprint!("{}", rejected.text);
            }
            return ExitCode::from(rejected.exit_code);
        }
    };
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
    // A broken NOTIFY_SOCKET is the supervisor's problem: said once, then the daemon serves.
    let notifier = notify::Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        None
    });
    let served = runtime.block_on(async {
        let shutdown = daemon::shutdown_signal().map_err(daemon::DaemonError::Signals)?;
        let engine = match splice::Engine::start(engine_config(&shared.config)) {
            Ok(engine) => engine,
            Err(e) => {
                eprintln!("ingressd: {e}");
                return Err(daemon::DaemonError::DataPath(e.to_string()));
            }
        };
        let settings = proxy::Settings::from_config(&shared.config);
        let metrics = metrics::Metrics::new();
        let access_log = match AccessLog::start(&shared.config.access_log, metrics.clone()) {
            Ok(log) => log,
            Err(e) => {
                eprintln!("ingressd: {e}");
                return Err(daemon::DaemonError::DataPath(e.to_string()));
            }
        };
        let data_path = proxy::DataPlane::new(
            shared.clone(),
            engine.clone(),
            settings,
            metrics,
            access_log.clone(),
        );
        let parts = daemon::Parts {
            shared,
            token,
            handler: Arc::new(data_path.clone()),
            probes: vec![Arc::new(data_path.clone())],
            observe: Some(Arc::new(data_path)),
            notifier,
        };
        let served = daemon::run(api, parts, shutdown).await;
        // Listeners are closed; flows still live get a short drain, then are reset.
        engine.shutdown(DRAIN).await;
        // The drained and reset flows' lines are written before the process exits.
        access_log.flush(LOG_FLUSH).await;
        served
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
