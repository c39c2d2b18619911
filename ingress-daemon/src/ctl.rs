//! `ingressd ctl`: an operator CLI speaking to the REST API.
//!
//! Design: a deliberately small blocking HTTP/1.1 client over `std::net::TcpStream`
//! (`Connection: close`, `Content-Length` or chunked responses): the CLI needs one request per
//! run, and the client is also used by the integration tests. Commands map one to one onto API
//! calls; lists print as aligned tables, everything else as pretty JSON; an API error prints
//! `code: message` and exits 1.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use clap::{Args, Subcommand};

/// A CLI or transport failure.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API could not be reached or answered garbage.
    #[error("talking to {addr}: {message}")]
    Transport {
        /// The API address.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// The API answered with an error body.
    #[error("{code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The stable error code.
        code: String,
        /// The API's message.
        message: String,
    },
    /// The command line was not usable.
    #[error("{0}")]
    Usage(String),
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A blocking client for the API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    token: Option<String>,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the API at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>, token: Option<String>) -> Self {
        Self {
            addr: addr.into(),
            token,
            timeout: Duration::from_secs(30),
        }
    }

    fn transport(&self, message: impl std::fmt::Display) -> CtlError {
        CtlError::Transport {
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }

    /// Sends one request with raw headers and body; returns whatever the server answered.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<HttpResponse, CtlError> {
        let target: SocketAddr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.transport(e))?
            .next()
            .ok_or_else(|| self.transport("no address"))?;
        let mut stream =
            TcpStream::connect_timeout(&target, self.timeout).map_err(|e| self.transport(e))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| self.transport(e))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .map_err(|e| self.transport(e))?;
        stream.write_all(body).map_err(|e| self.transport(e))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| self.transport(e))?;
        parse_response(&raw).map_err(|e| self.transport(e))
    }

    /// Sends a JSON request; a non-2xx answer becomes [`CtlError::Api`].
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<HttpResponse, CtlError> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let resp = self.send(method, path, headers, bytes.as_deref())?;
        if !(200..300).contains(&resp.status) {
            let v = resp.json();
            return Err(CtlError::Api {
                status: resp.status,
                code: v["code"].as_str().unwrap_or("http_error").to_owned(),
                message: v["message"]
                    .as_str()
                    .map_or_else(|| resp.text(), str::to_owned),
            });
        }
        Ok(resp)
    }
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete response head")?;
    let head =
        std::str::from_utf8(raw.get(..split).unwrap_or_default()).map_err(|_| "non-UTF-8 head")?;
    let rest = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(data.get(..eol).unwrap_or_default())
            .map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        data = data.get(eol + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// `ingressd ctl` arguments.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// API address (host:port); defaults to `INGRESSD_API_LISTEN` or 127.0.0.1:9180.
    #[arg(long, env = "INGRESSD_API_LISTEN", default_value = "127.0.0.1:9180")]
    pub api: String,
    /// Bearer token; defaults to `INGRESSD_API_TOKEN`.
    #[arg(long, env = "INGRESSD_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token; defaults to `INGRESSD_API_TOKEN_FILE`.
    #[arg(long, env = "INGRESSD_API_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ingressd ctl` commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Manage TCP ingresses.
    #[command(subcommand)]
    Ingress(IngressCommand),
    /// Show every owned port.
    Ports,
    /// Manage static instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
}

/// `ingressd ctl ingress` commands.
#[derive(Debug, Subcommand)]
pub enum IngressCommand {
    /// Create an ingress from flags or a JSON file.
    Create {
        /// Ingress name.
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// Listen port.
        #[arg(long, required_unless_present = "file")]
        port: Option<u16>,
        /// `SNI=INSTANCE:PORT[,mode=passthrough][,protocol=postgres][,proxy=v2]`, repeatable.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Default target `INSTANCE:PORT`.
        #[arg(long = "default")]
        default_target: Option<String>,
        /// A JSON body (`-` for standard input) instead of flags.
        #[arg(long, conflicts_with_all = ["name", "port", "rules", "default_target"])]
        file: Option<String>,
    },
    /// List ingresses.
    List,
    /// Show one ingress (ID, name or unique ID prefix).
    Get {
        /// ID, name or prefix.
        id: String,
    },
    /// Delete an ingress.
    Delete {
        /// ID, name or prefix.
        id: String,
    },
}

/// `ingressd ctl instance` commands.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Register or move an instance.
    Put {
        /// Instance name.
        name: String,
        /// IP address.
        address: String,
    },
    /// List instances.
    List,
}

fn parse_target(raw: &str) -> Result<(String, u16), CtlError> {
    let (instance, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| CtlError::Usage(format!("{raw:?}: expected INSTANCE:PORT")))?;
    let port = port
        .parse()
        .map_err(|_| CtlError::Usage(format!("{raw:?}: bad port")))?;
    Ok((instance.to_owned(), port))
}

/// Turns `SNI=INSTANCE:PORT[,key=value...]` into a rule object.
pub fn parse_rule(raw: &str) -> Result<serde_json::Value, CtlError> {
    let mut parts = raw.split(',');
    let head = parts.next().unwrap_or_default();
    let (sni, target) = head
        .split_once('=')
        .ok_or_else(|| CtlError::Usage(format!("{raw:?}: expected SNI=INSTANCE:PORT")))?;
    let (instance, port) = parse_target(target)?;
    let mut rule =
        serde_json::json!({"match": {"sni": sni}, "target": {"instance": instance, "port": port}});
    for opt in parts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| CtlError::Usage(format!("{opt:?}: expected key=value")))?;
        let key = match k {
            "mode" | "protocol" => k,
            "proxy" | "proxy_protocol" => "proxy_protocol",
            _ => return Err(CtlError::Usage(format!("{k:?}: unknown rule option"))),
        };
        rule[key] = v.into();
    }
    Ok(rule)
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Runs one `ctl` command; returns what to print on success.
pub fn run(args: CtlArgs) -> Result<String, CtlError> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", f.display())))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let client = ApiClient::new(args.api, token);
    let pretty =
        |r: HttpResponse| serde_json::to_string_pretty(&r.json()).unwrap_or_else(|_| r.text());
    match args.command {
        CtlCommand::Ingress(IngressCommand::Create {
            name,
            port,
            rules,
            default_target,
            file,
        }) => {
            let body = if let Some(file) = file {
                let text = if file == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .map_err(|e| CtlError::Usage(e.to_string()))?;
                    s
                } else {
                    std::fs::read_to_string(&file)
                        .map_err(|e| CtlError::Usage(format!("{file}: {e}")))?
                };
                serde_json::from_str(&text).map_err(|e| CtlError::Usage(format!("{file}: {e}")))?
            } else {
                let rules = rules
                    .iter()
                    .map(|r| parse_rule(r))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut body =
                    serde_json::json!({"name": name, "listen_port": port, "rules": rules});
                if let Some(d) = default_target {
                    let (instance, port) = parse_target(&d)?;
                    body["default_target"] =
                        serde_json::json!({"instance": instance, "port": port});
                }
                body
            };
            client
                .call("POST", "/tcp-ingresses", Some(&body))
                .map(pretty)
        }
        CtlCommand::Ingress(IngressCommand::List) => {
            let list = client.call("GET", "/tcp-ingresses", None)?.json();
            let mut rows = vec![vec![
                "ID".into(),
                "NAME".into(),
                "PORT".into(),
                "RULES".into(),
                "DEFAULT".into(),
            ]];
            for i in list.as_array().into_iter().flatten() {
                let default = &i["default_target"];
                rows.push(vec![
                    cell(&i["id"]),
                    cell(&i["name"]),
                    cell(&i["listen_port"]),
                    i["rules"].as_array().map_or(0, Vec::len).to_string(),
                    if default.is_null() {
                        "-".to_owned()
                    } else {
                        format!("{}:{}", cell(&default["instance"]), cell(&default["port"]))
                    },
                ]);
            }
            Ok(table(rows))
        }
        CtlCommand::Ingress(IngressCommand::Get { id }) => client
            .call("GET", &format!("/tcp-ingresses/{id}"), None)
            .map(pretty),
        CtlCommand::Ingress(IngressCommand::Delete { id }) => client
            .call("DELETE", &format!("/tcp-ingresses/{id}"), None)
            .map(|_| format!("deleted {id}")),
        CtlCommand::Ports => {
            let list = client.call("GET", "/ports", None)?.json();
            let mut rows = vec![vec![
                "PORT".into(),
                "KIND".into(),
                "OWNER".into(),
                "BOUND".into(),
            ]];
            for p in list.as_array().into_iter().flatten() {
                rows.push(vec![
                    cell(&p["port"]),
                    cell(&p["kind"]),
                    cell(&p["owner"]),
                    cell(&p["bound"]),
                ]);
            }
            Ok(table(rows))
        }
        CtlCommand::Instance(InstanceCommand::Put { name, address }) => {
            let body = serde_json::json!({"address": address});
            client
                .call("PUT", &format!("/instances/{name}"), Some(&body))
                .map(pretty)
        }
        CtlCommand::Instance(InstanceCommand::List) => {
            let list = client.call("GET", "/instances", None)?.json();
            let mut rows = vec![vec!["NAME".into(), "ADDRESS".into()]];
            for i in list.as_array().into_iter().flatten() {
                rows.push(vec![cell(&i["name"]), cell(&i["address"])]);
            }
            Ok(table(rows))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_from_the_command_line() {
        let r = parse_rule(
            "{id}.pg.example.com=pg-{id}:5432,mode=passthrough,protocol=postgres,proxy=v2",
        )
        .unwrap();
        assert_eq!(
            r,
            serde_json::json!({"match": {"sni": "{id}.pg.example.com"},
                "target": {"instance": "pg-{id}", "port": 5432},
                "mode": "passthrough", "protocol": "postgres", "proxy_protocol": "v2"})
        );
        assert!(parse_rule("a.b").is_err());
        assert!(parse_rule("a.b=c:x").is_err());
        assert!(parse_rule("a.b=c:1,colour=red").is_err());
    }

    #[test]
    fn responses_parse_with_length_or_chunks() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, b"{}".as_slice()));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }

    #[test]
    fn tables_align_columns() {
        let t = table(vec![
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d");
    }
}
