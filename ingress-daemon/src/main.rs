//! `ingressd`: wiring only — parse the command line and configuration, start logging, run.
use std::process::ExitCode;
use std::sync::Arc;

use ingress_daemon::access_log::AccessLog;
use ingress_daemon::cli::{Cli, Command};
use ingress_daemon::config::{Config, EXIT_CONFIG};
use ingress_daemon::{ctl, daemon, metrics, notify, proxy, splice, sys, takeover, upgrade};

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
        // As much as the gate lets be in flight (see `EngineConfig::send_buffer_bytes`).
        send_buffer_bytes: config.high_water_bytes,
        ..splice::EngineConfig::default()
    }
}

/// What this daemon hands over to the next one, besides the control plane.
struct Handing {
    data_plane: proxy::DataPlane,
    api: std::os::fd::OwnedFd,
    api_addr: std::net::SocketAddr,
    drain: std::time::Duration,
    handover: Arc<takeover::Handover>,
}

/// What runs once the records are loaded: finish a takeover (the old daemon exits), then
/// serve the control socket for the next one.
fn on_loaded(
    inherited: Option<takeover::Inherited>,
    handing: Handing,
    socket: std::path::PathBuf,
) -> daemon::OnLoaded {
    Box::new(move |control| {
        if let Some(inherited) = inherited {
            match inherited.finish() {
                Ok(()) => tracing::info!(
                    old_pid = inherited.old_pid,
                    took_ms = inherited.started.elapsed().as_secs_f64() * 1e3,
                    "takeover complete; serving"
                ),
                Err(e) => tracing::warn!(error = %e, "telling the old daemon to exit"),
            }
        }
        let side = takeover::OldSide {
            runtime: tokio::runtime::Handle::current(),
            data_plane: handing.data_plane,
            control,
            api: handing.api,
            api_addr: handing.api_addr,
            drain: handing.drain,
            handover: handing.handover,
        };
        if let Err(e) = takeover::serve(&socket, side) {
            tracing::warn!(error = %e, path = %socket.display(), "takeover control socket unavailable");
        }
    })
}

/// `ingressd upgrade`: start this binary with `--takeover` and wait until it serves.
fn upgrade(config: &Config, args: &upgrade::UpgradeArgs) -> ExitCode {
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ingressd: upgrade: locating this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match upgrade::run(
        &program,
        &upgrade::takeover_args(&argv),
        &config.data_dir,
        std::time::Duration::from_secs(args.timeout_secs),
    ) {
        Ok(pid) => {
            println!("ingressd: pid {pid} took over");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ingressd: upgrade: {e}");
            ExitCode::FAILURE
        }
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
    if let Some(Command::Upgrade(args)) = &cli.command {
        return upgrade(&config, args);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Descriptors a hand-off may dup or receive, grown while the process has one thread (the
    // table grows far slower once threads share it).
    let fd_reserve = 2 * config.max_flows + 1024;
    if let Err(e) = sys::reserve_fds(fd_reserve) {
        tracing::debug!(error = %e, "cannot pre-grow the descriptor table");
    }
    let mut inherited = if cli.takeover {
        match takeover::receive(&config.data_dir) {
            Ok(inherited) => Some(inherited),
            Err(e) => {
                eprintln!("ingressd: takeover: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let bound = match inherited.as_mut().and_then(|i| i.api.take()) {
        Some(api) => daemon::adopt_api(config, api),
        None => daemon::bind_api(config),
    };
    let (api, shared) = match bound {
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
        let started = match inherited.as_mut() {
            Some(i) => {
                let used = i.used_dirs();
                splice::Engine::start_adopting(
                    engine_config(&shared.config),
                    i.maps.take(),
                    &used,
                    i.program_version,
                    i.program.take(),
                )
            }
            None => splice::Engine::start(engine_config(&shared.config)),
        };
        let engine = match started {
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
        let mut inherited_listeners = Vec::new();
        if let Some(i) = inherited.as_mut() {
            inherited_listeners = std::mem::take(&mut i.listeners);
            for (flow, ingress) in std::mem::take(&mut i.flows) {
                if let Err(e) = data_path.adopt(flow, ingress.as_deref()) {
                    // The old daemon still holds every flow and resumes when this one exits.
                    eprintln!("ingressd: takeover: adopting a flow: {e}");
                    std::process::exit(1);
                }
            }
        }
        let handover = takeover::Handover::new();
        let control_socket = shared.config.data_dir.join(takeover::SOCKET_FILE);
        let on_loaded = match api.try_clone() {
            Ok(api_copy) => Some(on_loaded(
                inherited,
                Handing {
                    data_plane: data_path.clone(),
                    api: api_copy.into(),
                    api_addr: shared.config.api_listen,
                    drain: std::time::Duration::from_millis(shared.config.takeover_drain_ms),
                    handover: handover.clone(),
                },
                control_socket.clone(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep a copy of the api socket; takeovers disabled");
                None
            }
        };
        let parts = daemon::Parts {
            shared,
            token,
            handler: Arc::new(data_path.clone()),
            probes: vec![Arc::new(data_path.clone())],
            observe: Some(Arc::new(data_path)),
            notifier,
            inherited_listeners,
            on_loaded,
            handover: Some(handover.clone()),
        };
        let served = daemon::run(api, parts, shutdown).await;
        if handover.is_handed_over() {
            // The takeover thread exits the process once the terminated flows are done;
            // nothing here may run destructors meanwhile.
            std::future::pending::<()>().await;
        }
        // No takeover from a daemon that stops.
        let _ = std::fs::remove_file(control_socket);
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
