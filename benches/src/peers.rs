//! The peers ingressd is compared with — HAProxy and nginx — as child processes with configs
//! generated into a temporary directory, never as system services.
//!
//! Fair settings for every proxy: as many threads (HAProxy) or worker processes (nginx) as
//! ingressd has (one per CPU), no access log, the same timeouts (5 s to read the ClientHello or
//! finish the handshake, 5 s to connect, 300 s idle), room for 7,500 connections (HAProxy with splice needs two descriptors per connection plus a pipe pair per four, within the hard limit of 20,000), SNI routing
//! through a map with the benchmark's name in it.
use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::tls::SNI;

/// Seconds a client has to send its ClientHello (or finish the TLS handshake).
pub const HANDSHAKE_TIMEOUT_S: u32 = 5;
/// Seconds a proxy has to connect to the backend.
pub const CONNECT_TIMEOUT_S: u32 = 5;
/// Seconds a connection may stay idle (the idle-memory metric holds connections open).
pub const IDLE_TIMEOUT_S: u32 = 300;
/// Connections a proxy accepts at once.
pub const MAX_CONNECTIONS: u32 = 7_500;

/// What a peer does with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsHandling {
    /// Route on the ClientHello's SNI and pass the TLS session through.
    Passthrough,
    /// Terminate TLS and send plaintext to the backend.
    Terminate,
}

/// Files a terminating peer presents.
#[derive(Clone, Debug)]
pub struct CertPaths {
    /// Certificate, PEM.
    pub cert: PathBuf,
    /// Key, PEM.
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

/// Everything a peer config needs.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where it sends the benchmark's SNI.
    pub backend: SocketAddr,
    /// Passthrough or terminate.
    pub tls: TlsHandling,
    /// HAProxy only: `option splice-request` and `option splice-response`.
    pub splice: bool,
    /// Threads or worker processes.
    pub workers: usize,
    /// Certificate files (terminate).
    pub certs: CertPaths,
}

/// The HAProxy configuration for `spec`; `map` is the SNI → backend map file it reads.
pub fn haproxy_config(spec: &PeerSpec, map: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "global");
    let _ = writeln!(c, "    nbthread {}", spec.workers);
    let _ = writeln!(c, "    maxconn {MAX_CONNECTIONS}");
    let _ = writeln!(
        c,
        "    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256"
    );
    let _ = writeln!(c, "    ssl-default-bind-options ssl-min-ver TLSv1.3");
    let _ = writeln!(c, "\ndefaults");
    let _ = writeln!(c, "    mode tcp");
    let _ = writeln!(c, "    timeout connect {CONNECT_TIMEOUT_S}s");
    let _ = writeln!(c, "    timeout client {IDLE_TIMEOUT_S}s");
    let _ = writeln!(c, "    timeout server {IDLE_TIMEOUT_S}s");
    if spec.splice {
        let _ = writeln!(c, "    option splice-request");
        let _ = writeln!(c, "    option splice-response");
    }
    let _ = writeln!(c, "\nfrontend bench");
    let _ = writeln!(c, "    maxconn {MAX_CONNECTIONS}");
    match spec.tls {
        TlsHandling::Passthrough => {
            let _ = writeln!(c, "    bind {}", spec.listen);
            let _ = writeln!(c, "    tcp-request inspect-delay {HANDSHAKE_TIMEOUT_S}s");
            let _ = writeln!(
                c,
                "    tcp-request content accept if {{ req.ssl_hello_type 1 }}"
            );
            let _ = writeln!(
                c,
                "    use_backend %[req.ssl_sni,lower,map({},unrouted)]",
                map.display()
            );
        }
        TlsHandling::Terminate => {
            let _ = writeln!(
                c,
                "    bind {} ssl crt {} curves X25519",
                spec.listen,
                spec.certs.combined.display()
            );
            let _ = writeln!(
                c,
                "    use_backend %[ssl_fc_sni,lower,map({},unrouted)]",
                map.display()
            );
        }
    }
    let _ = writeln!(c, "\nbackend bench");
    let _ = writeln!(c, "    server backend {}", spec.backend);
    let _ = writeln!(c, "\nbackend unrouted");
    let _ = writeln!(c, "    tcp-request content reject");
    c
}

/// The nginx configuration for `spec`, with its pid and error log in `dir`.
pub fn nginx_config(spec: &PeerSpec, dir: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    );
    let _ = writeln!(c, "worker_processes {};", spec.workers);
    let _ = writeln!(c, "worker_rlimit_nofile {};", MAX_CONNECTIONS * 2 + 100);
    let _ = writeln!(c, "pid {};", dir.join("nginx.pid").display());
    let _ = writeln!(
        c,
        "error_log {} warn;",
        dir.join("nginx-error.log").display()
    );
    let _ = writeln!(
        c,
        "events {{ worker_connections {}; }}",
        MAX_CONNECTIONS * 2
    );
    let _ = writeln!(c, "stream {{");
    let var = match spec.tls {
        TlsHandling::Passthrough => "$ssl_preread_server_name",
        TlsHandling::Terminate => "$ssl_server_name",
    };
    let _ = writeln!(c, "    map {var} $bench_upstream {{");
    let _ = writeln!(c, "        {SNI} bench;");
    let _ = writeln!(c, "        default unrouted;");
    let _ = writeln!(c, "    }}");
    let _ = writeln!(c, "    upstream bench {{ server {}; }}", spec.backend);
    // Port 9 on loopback refuses: an unrouted name is closed, as in the other proxies.
    let _ = writeln!(c, "    upstream unrouted {{ server 127.0.0.1:9; }}");
    let _ = writeln!(c, "    server {{");
    match spec.tls {
        TlsHandling::Passthrough => {
            let _ = writeln!(c, "        listen {};", spec.listen);
            let _ = writeln!(c, "        ssl_preread on;");
            let _ = writeln!(c, "        preread_timeout {HANDSHAKE_TIMEOUT_S}s;");
        }
        TlsHandling::Terminate => {
            let _ = writeln!(c, "        listen {} ssl;", spec.listen);
            let _ = writeln!(c, "        ssl_certificate {};", spec.certs.cert.display());
            let _ = writeln!(
                c,
                "        ssl_certificate_key {};",
                spec.certs.key.display()
            );
            let _ = writeln!(c, "        ssl_protocols TLSv1.3;");
            let _ = writeln!(c, "        ssl_ecdh_curve X25519;");
            let _ = writeln!(
                c,
                "        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;"
            );
            let _ = writeln!(c, "        ssl_handshake_timeout {HANDSHAKE_TIMEOUT_S}s;");
        }
    }
    let _ = writeln!(c, "        proxy_pass $bench_upstream;");
    let _ = writeln!(c, "        proxy_connect_timeout {CONNECT_TIMEOUT_S}s;");
    let _ = writeln!(c, "        proxy_timeout {IDLE_TIMEOUT_S}s;");
    let _ = writeln!(c, "    }}");
    let _ = writeln!(c, "}}");
    c
}

/// Writes HAProxy's config and map into `dir`; returns the command that runs it in the
/// foreground.
pub fn haproxy_command(spec: &PeerSpec, dir: &Path) -> Result<Command> {
    let map = dir.join("sni.map");
    fs::write(&map, format!("{SNI} bench\n")).context("writing the HAProxy map")?;
    let cfg = dir.join("haproxy.cfg");
    fs::write(&cfg, haproxy_config(spec, &map)).context("writing haproxy.cfg")?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    Ok(cmd)
}

/// Writes nginx's config into `dir`; returns the command that runs it in the foreground with
/// `dir` as its prefix.
pub fn nginx_command(spec: &PeerSpec, dir: &Path) -> Result<Command> {
    let cfg = dir.join("nginx.conf");
    fs::write(&cfg, nginx_config(spec, dir)).context("writing nginx.conf")?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(&cfg)
        .args(["-g", "daemon off;"]);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tls: TlsHandling, splice: bool) -> PeerSpec {
        PeerSpec {
            listen: "127.0.0.1:4000".parse().unwrap(),
            backend: "127.0.0.1:5000".parse().unwrap(),
            tls,
            splice,
            workers: 2,
            certs: CertPaths {
                cert: "/t/c.crt".into(),
                key: "/t/c.key".into(),
                combined: "/t/c.pem".into(),
            },
        }
    }

    #[test]
    fn haproxy_routes_on_the_hello_and_splices_only_when_asked() {
        let c = haproxy_config(&spec(TlsHandling::Passthrough, false), Path::new("/t/m"));
        assert!(c.contains("nbthread 2"));
        assert!(c.contains("req.ssl_sni,lower,map(/t/m,unrouted)"));
        assert!(c.contains("tcp-request inspect-delay 5s"));
        assert!(!c.contains("splice"));
        assert!(!c.contains("\n    log"));
        let c = haproxy_config(&spec(TlsHandling::Passthrough, true), Path::new("/t/m"));
        assert!(c.contains("option splice-request") && c.contains("option splice-response"));
        let c = haproxy_config(&spec(TlsHandling::Terminate, false), Path::new("/t/m"));
        assert!(c.contains("bind 127.0.0.1:4000 ssl crt /t/c.pem"));
        assert!(c.contains("ssl_fc_sni"));
    }

    #[test]
    fn nginx_prereads_or_terminates() {
        let c = nginx_config(&spec(TlsHandling::Passthrough, false), Path::new("/t"));
        assert!(c.contains("ssl_preread on;") && c.contains("$ssl_preread_server_name"));
        assert!(c.contains("worker_processes 2;"));
        assert!(c.contains("bench.example.com bench;"));
        let c = nginx_config(&spec(TlsHandling::Terminate, false), Path::new("/t"));
        assert!(c.contains("listen 127.0.0.1:4000 ssl;") && c.contains("$ssl_server_name"));
    }
}
