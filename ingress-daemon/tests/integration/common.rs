//! Shared test fixtures: temporary data dirs, an in-process daemon, a test-only forwarding
//! handler, echo backends and certificates.
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingress_daemon::backend::Instances;
use ingress_daemon::config::{ApiToken, Config};
use ingress_daemon::control::Shared;
use ingress_daemon::ctl::{ApiClient, HttpResponse};
use ingress_daemon::daemon;
use ingress_daemon::listeners::{ConnectionHandler, IngressHandle};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ingressd-it-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

/// A configuration for tests: API on 127.0.0.1:0, listeners on 127.0.0.1.
pub fn test_config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_owned(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        listen_addr: "127.0.0.1".parse().unwrap(),
        api_max_body_bytes: 64 * 1024,
        ..Config::default()
    }
}

/// Routes every connection to the ingress's default target and copies bytes both ways.
/// Test-only: the product's data path parses the ClientHello and splices.
pub struct ForwardHandler {
    pub instances: Arc<Instances>,
}

impl ConnectionHandler for ForwardHandler {
    fn serve(&self, ingress: Arc<IngressHandle>, listener: TcpListener) -> JoinHandle<()> {
        let instances = self.instances.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = ingress.closed() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let target = {
                    let routes = ingress.routes.load();
                    routes.lookup(None).and_then(|r| {
                        instances
                            .address(&r.instance)
                            .map(|ip| SocketAddr::new(ip, r.port))
                    })
                };
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    if let Ok(mut backend) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    }
                });
            }
        })
    }
}

/// An in-process daemon serving its API on a real socket.
pub struct Server {
    pub addr: SocketAddr,
    token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(config: Config) -> Self {
        let token = config.validate().unwrap();
        Self::start_with(config, token, |shared| {
            Arc::new(ForwardHandler {
                instances: shared.instances.clone(),
            })
        })
    }

    pub fn start_with(
        config: Config,
        token: Option<ApiToken>,
        handler: impl FnOnce(&Shared) -> Arc<dyn ConnectionHandler>,
    ) -> Self {
        let raw_token = config.api_token.as_ref().map(|t| t.expose().to_owned());
        let (api, shared) = daemon::bind_api(config).unwrap();
        let addr = shared.config.api_listen;
        let parts = daemon::Parts {
            handler: handler(&shared),
            shared,
            token,
            probes: Vec::new(),
            observe: None,
            notifier: None,
            inherited_listeners: Vec::new(),
            on_loaded: None,
            handover: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                daemon::run(api, parts, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let server = Self {
            addr,
            token: raw_token,
            stop: Some(stop),
            thread: Some(thread),
        };
        wait_for("the api", Duration::from_secs(20), || {
            server
                .client()
                .send("GET", "/healthz", &[], None)
                .ok()
                .filter(|r| r.status == 200)
        });
        server
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(self.addr.to_string(), self.token.clone())
    }

    pub fn anonymous(&self) -> ApiClient {
        ApiClient::new(self.addr.to_string(), None)
    }

    /// Sends a JSON body (or none) and returns the raw response.
    pub fn req(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> HttpResponse {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let headers: &[(&str, &str)] = if bytes.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        self.client()
            .send(method, path, headers, bytes.as_deref())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server on 127.0.0.1 running on its own thread; returns its port.
pub fn echo_server() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    port
}

/// A self-signed certificate and key (PEM) for `sans`.
pub fn cert_pem(sans: &[&str]) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(
        sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// Asserts an error response's status and exact body.
#[track_caller]
pub fn assert_error(resp: &HttpResponse, status: u16, code: &str, message: &str) {
    assert_eq!(
        (resp.status, resp.json()),
        (
            status,
            serde_json::json!({"code": code, "message": message})
        ),
        "raw body: {}",
        resp.text()
    );
}

/// The bytes of a real ClientHello (rustls) for `sni` (an IP literal sends no SNI).
pub fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Sends a ClientHello for `sni` and a payload to 127.0.0.1:`port`, where an ingress passes
/// `sni` through to an echo server; true when the same bytes come back.
pub fn echoes(port: u16, sni: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = client_hello(sni, &[]);
    sent.extend((0..4096).map(|i| (i % 251) as u8));
    if s.write_all(&sent).is_err() {
        return false;
    }
    let mut back = vec![0u8; sent.len()];
    s.read_exact(&mut back).is_ok() && back == sent
}
