//! The real `ingressd` binary: configuration errors, `ctl`, and recovery after `kill -9`.
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::{TempDir, accepts, cert_pem, echo_server, echoes, free_port, wait_for};
use crate::ingressd::{BIN, Daemon};

#[test]
fn bad_configuration_exits_64_with_one_line() {
    let dir = TempDir::new("badcfg");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("INGRESSD_API_LISTEN", "0.0.0.0:0")],
            "ingressd: api_listen: listening beyond loopback requires api_token or api_token_file\n",
        ),
        (
            &[("INGRESSD_CONFIG", "/nonexistent/ingressd.toml")],
            "ingressd: config file /nonexistent/ingressd.toml: No such file or directory (os error 2)\n",
        ),
        (
            &[("INGRESSD_MAX_FLOWS", "many")],
            "ingressd: INGRESSD_MAX_FLOWS: \"many\" is not an integer\n",
        ),
        (
            &[("INGRESSD_OFFLOAD", "sometimes")],
            "ingressd: configuration: unknown variant `sometimes`, expected one of `auto`, `off`, `required` in `offload`\n",
        ),
    ];
    for (env, want) in cases {
        let out = Command::new(BIN)
            .env_clear()
            .env("INGRESSD_DATA_DIR", dir.path())
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{env:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), *want, "{env:?}");
    }
}

#[test]
fn everything_comes_back_after_kill_9_and_corrupt_records_are_reported() {
    let dir = TempDir::new("restart");
    let d = Daemon::start(dir.path());
    let c = d.client();

    // Create through the operator CLI and the API.
    d.ctl(&["instance", "put", "db", "127.0.0.1"]);
    d.ctl(&["instance", "put", "cache", "127.0.0.3"]);
    let (cert, key) = cert_pem(&["*.pg.example.com"]);
    c.call(
        "POST",
        "/certificates",
        Some(&json!({"name": "pg", "cert_pem": cert, "key_pem": key})),
    )
    .unwrap();
    let claim = free_port();
    c.call(
        "PUT",
        &format!("/port-claims/{claim}"),
        Some(&json!({"owner": "http-ingress"})),
    )
    .unwrap();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let out = d.ctl(&[
        "ingress",
        "create",
        "--name",
        "pg",
        "--port",
        &p1.to_string(),
        "--rule",
        "{id}.pg.example.com=pg-{id}:5432",
    ]);
    let pg: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rules = ["--rule", "db.example.com=db:5432,mode=passthrough"];
    d.ctl(&[
        "ingress",
        "create",
        "--name",
        "plain",
        "--port",
        &p2.to_string(),
        rules[0],
        rules[1],
        "--default",
        "db:5433",
    ]);
    d.ctl(&[
        "ingress",
        "create",
        "--name",
        "doomed",
        "--port",
        &p3.to_string(),
        "--default",
        "db:1",
    ]);
    let list = d.ctl(&["ingress", "list"]);
    assert!(list.starts_with("ID"), "{list}");
    assert_eq!(list.lines().count(), 4, "{list}");
    let got: serde_json::Value = serde_json::from_str(&d.ctl(&["ingress", "get", "pg"])).unwrap();
    assert_eq!(got, pg);
    assert_eq!(
        d.ctl(&["instance", "list"]),
        "NAME   ADDRESS\ncache  127.0.0.3\ndb     127.0.0.1\n"
    );
    let ports = d.ctl(&["ports"]);
    assert!(ports.contains(&format!("{claim}  claim")), "{ports}");
    let before: Vec<serde_json::Value> =
        ["/tcp-ingresses", "/instances", "/certificates", "/ports"]
            .iter()
            .map(|p| c.call("GET", p, None).unwrap().json())
            .collect();
    assert!(accepts(p1) && accepts(p2) && accepts(p3));

    d.kill9();

    // Damage two records: truncate one ingress, garble one instance.
    let doomed_id = before[0]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "doomed")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doomed_path = dir.path().join(format!("tcp-ingresses/{doomed_id}.json"));
    let full = std::fs::read(&doomed_path).unwrap();
    let truncated = full[..full.len() / 3].to_vec();
    std::fs::write(&doomed_path, &truncated).unwrap();
    let cache_path = dir.path().join("instances/cache.json");
    std::fs::write(&cache_path, b"\0\0garbage").unwrap();

    let d = Daemon::start(dir.path());
    let c = d.client();
    let after: Vec<serde_json::Value> = ["/tcp-ingresses", "/instances", "/certificates", "/ports"]
        .iter()
        .map(|p| c.call("GET", p, None).unwrap().json())
        .collect();
    let without = |v: &serde_json::Value, key: &str, val: &str| {
        json!(
            v.as_array()
                .unwrap()
                .iter()
                .filter(|x| x[key] != val)
                .cloned()
                .collect::<Vec<_>>()
        )
    };
    assert_eq!(after[0], without(&before[0], "name", "doomed"));
    assert_eq!(after[1], without(&before[1], "name", "cache"));
    assert_eq!(after[2], before[2]);
    let api_port: u64 = d.api.rsplit(':').next().unwrap().parse().unwrap();
    let ports_after: Vec<_> = after[3]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner"] != "api" && p["owner"] != "doomed")
        .cloned()
        .collect();
    let ports_before: Vec<_> = before[3]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner"] != "api" && p["owner"] != "doomed")
        .cloned()
        .collect();
    assert_eq!(ports_after, ports_before);
    assert!(
        after[3]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["owner"] == "api" && p["port"] == api_port)
    );
    assert_eq!(
        c.call(
            "GET",
            &format!("/tcp-ingresses/{}", pg["id"].as_str().unwrap()),
            None
        )
        .unwrap()
        .json(),
        pg
    );
    assert!(accepts(p1) && accepts(p2));
    assert!(!accepts(p3));

    // Liveness stays green; readiness reports both damaged files; both are kept untouched.
    assert_eq!(c.call("GET", "/healthz", None).unwrap().status, 200);
    let ready = c.send("GET", "/readyz", &[], None).unwrap();
    assert_eq!(ready.status, 200);
    let ready = ready.json();
    assert_eq!(ready["status"], json!("degraded"));
    let failed: Vec<(String, String)> = ready["failed_records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["reason"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        vec![
            (
                "instances/cache.json".to_owned(),
                "corrupt or truncated".to_owned()
            ),
            (
                format!("tcp-ingresses/{doomed_id}.json"),
                "corrupt or truncated".to_owned()
            ),
        ]
    );
    let listeners = ready["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 2);
    assert_eq!(std::fs::read(&doomed_path).unwrap(), truncated);
    assert_eq!(std::fs::read(&cache_path).unwrap(), b"\0\0garbage");

    // The freed port can be taken again; the corrupt file is still not overwritten.
    c.call("POST", "/tcp-ingresses", Some(&json!({"name": "doomed", "listen_port": p3, "default_target": {"instance": "db", "port": 1}}))).unwrap();
    assert!(accepts(p3));
    assert_eq!(std::fs::read(&doomed_path).unwrap(), truncated);
    d.kill9();
}

#[test]
fn sigterm_closes_listeners_and_exits_cleanly() {
    let dir = TempDir::new("sigterm");
    let mut d = Daemon::start(dir.path());
    d.ctl(&["instance", "put", "db", "127.0.0.1"]);
    let port = free_port();
    d.ctl(&[
        "ingress",
        "create",
        "--name",
        "a",
        "--port",
        &port.to_string(),
        "--default",
        "db:1",
    ]);
    assert!(accepts(port));
    let pid = d.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_for("ingressd to exit", Duration::from_secs(20), || {
        d.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
    assert!(!accepts(port));
}

/// A passthrough ingress body: `sni` to the echo server on `echo`.
fn passthrough(name: &str, port: u16, sni: &str, echo: u16) -> serde_json::Value {
    json!({"name": name, "listen_port": port, "rules": [{"match": {"sni": sni},
        "target": {"instance": "echo", "port": echo}, "mode": "passthrough"}]})
}

#[test]
fn an_ingress_whose_port_is_taken_at_start_is_reported_and_kept() {
    let dir = TempDir::new("taken");
    let echo = echo_server();
    let d = Daemon::start(dir.path());
    let c = d.client();
    d.ctl(&["instance", "put", "echo", "127.0.0.1"]);
    let (taken, open) = (free_port(), free_port());
    let blocked = c
        .call(
            "POST",
            "/tcp-ingresses",
            Some(&passthrough("blocked", taken, "blocked.example.com", echo)),
        )
        .unwrap()
        .json();
    c.call(
        "POST",
        "/tcp-ingresses",
        Some(&passthrough("open", open, "open.example.com", echo)),
    )
    .unwrap();
    assert!(echoes(taken, "blocked.example.com") && echoes(open, "open.example.com"));
    d.kill9();

    // Another process takes the port before the daemon comes back.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
    let id = blocked["id"].as_str().unwrap();
    let record = dir.path().join(format!("tcp-ingresses/{id}.json"));
    let stored = std::fs::read(&record).unwrap();

    let d = Daemon::start(dir.path());
    let c = d.client();
    assert_eq!(c.call("GET", "/healthz", None).unwrap().status, 200);
    let ready = c.send("GET", "/readyz", &[], None).unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    let ready = ready.json();
    assert_eq!(ready["status"], json!("degraded"), "{ready}");
    assert_eq!(ready["failed_records"], json!([]), "{ready}");
    let unbound = ready["unbound"].as_array().unwrap();
    assert_eq!(unbound.len(), 1, "{ready}");
    assert_eq!(
        (
            &unbound[0]["ingress_id"],
            &unbound[0]["name"],
            &unbound[0]["listen_port"]
        ),
        (&json!(id), &json!("blocked"), &json!(taken))
    );
    let error = unbound[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("127.0.0.1:{taken} is already in use by "))
            && error.ends_with(&format!("(pid {})", std::process::id())),
        "{error}"
    );
    let listeners = ready["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{ready}");

    // The other ingress works; the record is still served and still on disk, untouched; the
    // port stays with the process that took it.
    assert!(echoes(open, "open.example.com"));
    assert_eq!(
        c.call("GET", "/tcp-ingresses/blocked", None)
            .unwrap()
            .json(),
        blocked
    );
    let ports = c.call("GET", "/ports", None).unwrap().json();
    let bound = |name: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["owner"] == name)
            .unwrap()["bound"]
            .clone()
    };
    assert_eq!(
        (bound("blocked"), bound("open")),
        (json!(false), json!(true))
    );
    assert_eq!(std::fs::read(&record).unwrap(), stored);
    let probe = std::net::TcpStream::connect(("127.0.0.1", taken)).unwrap();
    let (_, from) = squatter.accept().unwrap();
    assert_eq!(from, probe.local_addr().unwrap());

    // Once the port is free, replacing the ingress with the same spec binds it.
    drop((probe, squatter));
    let replaced = c
        .call(
            "PUT",
            "/tcp-ingresses/blocked",
            Some(&passthrough("blocked", taken, "blocked.example.com", echo)),
        )
        .unwrap();
    assert_eq!(replaced.status, 200);
    assert!(echoes(taken, "blocked.example.com"));
    let ready = c.send("GET", "/readyz", &[], None).unwrap().json();
    assert_eq!(
        (&ready["status"], &ready["unbound"]),
        (&json!("ready"), &json!([]))
    );
}

#[test]
fn a_replace_onto_a_taken_port_changes_nothing() {
    let dir = TempDir::new("replace-taken");
    let echo = echo_server();
    let d = Daemon::start(dir.path());
    let c = d.client();
    d.ctl(&["instance", "put", "echo", "127.0.0.1"]);
    let port = free_port();
    let created = c
        .call(
            "POST",
            "/tcp-ingresses",
            Some(&passthrough("x", port, "a.example.com", echo)),
        )
        .unwrap()
        .json();
    let id = created["id"].as_str().unwrap();
    let record = dir.path().join(format!("tcp-ingresses/{id}.json"));
    let stored = std::fs::read(&record).unwrap();

    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let resp = c
        .send(
            "PUT",
            "/tcp-ingresses/x",
            &[("Content-Type", "application/json")],
            Some(
                passthrough("x", taken, "b.example.com", echo)
                    .to_string()
                    .as_bytes(),
            ),
        )
        .unwrap();
    let body = resp.json();
    assert_eq!(
        (resp.status, &body["code"]),
        (409, &json!("port_in_use")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().starts_with(&format!(
            "listen_port: 127.0.0.1:{taken} is already in use by "
        )),
        "{body}"
    );

    // The old ingress: same record in memory and on disk, same listener, same table.
    assert_eq!(
        c.call("GET", "/tcp-ingresses/x", None).unwrap().json(),
        created
    );
    assert_eq!(std::fs::read(&record).unwrap(), stored);
    assert!(echoes(port, "a.example.com"));
    assert!(!echoes(port, "b.example.com"));
    let ready = c.send("GET", "/readyz", &[], None).unwrap().json();
    assert_eq!(ready["status"], json!("ready"), "{ready}");

    // And after a restart.
    d.kill9();
    drop(squatter);
    let d = Daemon::start(dir.path());
    let c = d.client();
    assert_eq!(
        c.call("GET", "/tcp-ingresses/x", None).unwrap().json(),
        created
    );
    assert!(echoes(port, "a.example.com"));
    assert!(!accepts(taken));
}
