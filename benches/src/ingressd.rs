//! ingressd as a benchmark target: the real daemon, configured through its API — an instance,
//! a TCP ingress with a passthrough or terminate rule, and for terminate the certificate.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};
use ingress_tests::{
    ApiClient,
    ports::PortLease,
    process::{ChildGuard, tail, wait_until},
};
use serde_json::{Value, json};

use crate::{peers, tls::BenchPki, tls::SNI};

/// Which ingressd configuration a target runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressdMode {
    /// Passthrough, spliced in the kernel (`INGRESSD_OFFLOAD=required`).
    Kernel,
    /// Passthrough, relayed in userspace (`INGRESSD_OFFLOAD=off`).
    Userspace,
    /// Passthrough, spliced in the kernel except bulk flows, which keep the userspace relay
    /// (`INGRESSD_OFFLOAD=required`, `INGRESSD_BULK_FLOWS=userspace`).
    Adaptive,
    /// TLS terminated by ingressd, plaintext to the backend.
    Terminate,
}

/// The name of the benchmark's ingress and instance.
const NAME: &str = "bench";

/// Rules of the large routing table.
pub const MANY_RULES: usize = 10_000;

/// A running, configured ingressd.
pub struct IngressdTarget {
    daemon: ChildGuard,
    api: ApiClient,
    mode: IngressdMode,
    backend_port: u16,
    listen: SocketAddr,
    _leases: [PortLease; 2],
    _dir: tempfile::TempDir,
}

impl IngressdTarget {
    /// Starts `binary` in `mode` and configures one rule for the benchmark's SNI, to the TLS
    /// backend (passthrough) or the plaintext one (terminate).
    pub fn start(
        binary: &Path,
        mode: IngressdMode,
        tls_backend: SocketAddr,
        plain_backend: SocketAddr,
        pki: &BenchPki,
    ) -> Result<Self> {
        let offload = match mode {
            IngressdMode::Kernel | IngressdMode::Adaptive => "required",
            IngressdMode::Userspace | IngressdMode::Terminate => "off",
        };
        let dir = tempfile::Builder::new()
            .prefix("ingress-bench-ingressd-")
            .tempdir()?;
        // A leased API port rather than port 0: the address is known without reading it back.
        let api_lease = PortLease::new()?;
        let api_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, api_lease.port()));
        let mut cmd = Command::new(binary);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("INGRESSD_") || key == "RESERVED_PORTS" {
                cmd.env_remove(&*key);
            }
        }
        cmd.current_dir(dir.path())
            .env("INGRESSD_DATA_DIR", dir.path().join("data"))
            .env("INGRESSD_API_LISTEN", api_addr.to_string())
            .env("INGRESSD_OFFLOAD", offload)
            .env("INGRESSD_LISTEN_ADDR", "127.0.0.1")
            .env("INGRESSD_ACCESS_LOG", "off")
            .env("INGRESSD_API_MAX_BODY_BYTES", (32u32 << 20).to_string())
            .env(
                "INGRESSD_CONNECT_TIMEOUT_MS",
                (peers::CONNECT_TIMEOUT_S * 1000).to_string(),
            )
            .env(
                "INGRESSD_HANDSHAKE_TIMEOUT_MS",
                (peers::HANDSHAKE_TIMEOUT_S * 1000).to_string(),
            )
            .env("INGRESSD_MAX_FLOWS", peers::MAX_CONNECTIONS.to_string())
            .env("RUST_LOG", "warn");
        if mode == IngressdMode::Adaptive {
            cmd.env("INGRESSD_BULK_FLOWS", "userspace");
        }
        let log = dir.path().join("ingressd.log");
        let mut daemon = ChildGuard::spawn("ingressd", &mut cmd, Some(&log))?;
        let api = ApiClient::new(api_addr)?;
        let healthy = wait_until(
            "ingressd to answer GET /healthz",
            Duration::from_secs(30),
            || {
                daemon.ensure_running()?;
                Ok(api.healthz().ok().filter(|r| r.status == 200).map(drop))
            },
        );
        if let Err(e) = healthy {
            bail!("starting ingressd: {e}\n{}", tail(&log, 20));
        }
        check(
            "PUT /instances/bench",
            api.put_instance(NAME, Ipv4Addr::LOCALHOST)?,
        )?;
        if mode == IngressdMode::Terminate {
            check(
                "POST /certificates",
                api.add_certificate(NAME, &pki.leaf.cert_pem, &pki.leaf.key_pem)?,
            )?;
        }
        let lease = PortLease::new()?;
        let backend_port = match mode {
            IngressdMode::Terminate => plain_backend.port(),
            _ => tls_backend.port(),
        };
        let target = Self {
            daemon,
            api,
            mode,
            backend_port,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, lease.port())),
            _leases: [api_lease, lease],
            _dir: dir,
        };
        check(
            "POST /tcp-ingresses",
            target
                .api
                .create_ingress(&target.ingress(vec![target.rule(SNI)]))?,
        )?;
        Ok(target)
    }

    /// Where clients connect.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail(20)
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            IngressdMode::Terminate => "terminate",
            _ => "passthrough",
        }
    }

    fn rule(&self, sni: &str) -> Value {
        json!({
            "match": {"sni": sni},
            "target": {"instance": NAME, "port": self.backend_port},
            "mode": self.mode_name(),
        })
    }

    fn ingress(&self, rules: Vec<Value>) -> Value {
        json!({"name": NAME, "listen_port": self.listen.port(), "rules": rules})
    }

    /// Replaces the ingress's rules: the benchmark's one rule, or [`MANY_RULES`] rules — half
    /// exact names `db<i>.example.com`, half patterns `{id}.r<i>.example.com` — whose last two
    /// match [`crate::tls::SNI_LAST_EXACT`] and [`crate::tls::SNI_LAST_PATTERN`].
    pub fn set_rules(&self, many: bool) -> Result<()> {
        let rules = if many {
            let mut rules = Vec::with_capacity(MANY_RULES);
            for i in 0..MANY_RULES / 2 {
                rules.push(self.rule(&format!("db{i}.example.com")));
                let mut pattern = self.rule(&format!("{{id}}.r{i}.example.com"));
                pattern["target"]["instance"] = json!("{id}");
                rules.push(pattern);
            }
            rules
        } else {
            vec![self.rule(SNI)]
        };
        check(
            "PUT /tcp-ingresses/bench",
            self.api.replace_ingress(NAME, &self.ingress(rules))?,
        )
    }
}

fn check(what: &str, response: ingress_tests::ApiResponse) -> Result<()> {
    if !(200..300).contains(&response.status) {
        bail!("{what}: HTTP {} {}", response.status, response.text);
    }
    Ok(())
}
