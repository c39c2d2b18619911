//! `ingressd ctl` against the real daemon: API errors become `code: message` and a failing exit
//! status, `ingress delete` closes the listener, and a token comes from a flag or a file.
use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use crate::common::{TempDir, accepts, free_port};
use crate::ingressd::Daemon;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn api_errors_print_code_and_message_and_fail() {
    let dir = TempDir::new("ctlerr");
    let d = Daemon::start(dir.path());
    d.ctl(&["instance", "put", "db", "127.0.0.1"]);
    let port = free_port().to_string();
    let bad = d.ctl_output(&[
        "ingress",
        "create",
        "--name",
        "Bad_Name",
        "--port",
        &port,
        "--default",
        "db:1",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert!(bad.stdout.is_empty());
    let err = stderr(&bad);
    assert!(
        err.starts_with("error: invalid_name: name: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("Bad_Name"), "{err}");
    // Nothing was created.
    assert_eq!(
        d.ctl(&["ingress", "list"]),
        "ID  NAME  PORT  RULES  DEFAULT\n"
    );

    let missing = d.ctl_output(&["ingress", "get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        stderr(&missing),
        "error: not_found: tcp ingress \"nope\" does not exist\n"
    );
    // A client-side mistake never reaches the API.
    let usage = d.ctl_output(&[
        "ingress",
        "create",
        "--name",
        "a",
        "--port",
        &port,
        "--rule",
        "a.example.com",
    ]);
    assert_eq!(usage.status.code(), Some(1));
    assert_eq!(
        stderr(&usage),
        "error: \"a.example.com\": expected SNI=INSTANCE:PORT\n"
    );
}

#[test]
fn ingress_delete_removes_the_ingress_and_closes_its_listener() {
    let dir = TempDir::new("ctldel");
    let d = Daemon::start(dir.path());
    d.ctl(&["instance", "put", "db", "127.0.0.1"]);
    let port = free_port();
    let created: serde_json::Value = serde_json::from_str(&d.ctl(&[
        "ingress",
        "create",
        "--name",
        "gone",
        "--port",
        &port.to_string(),
        "--default",
        "db:1",
    ]))
    .unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(accepts(port));
    // By unique ID prefix.
    assert_eq!(
        d.ctl(&["ingress", "delete", &id[..6]]),
        format!("deleted {}\n", &id[..6])
    );
    assert!(!accepts(port));
    assert_eq!(
        d.ctl(&["ingress", "list"]),
        "ID  NAME  PORT  RULES  DEFAULT\n"
    );
    assert!(!dir.path().join(format!("tcp-ingresses/{id}.json")).exists());
    let again = d.ctl_output(&["ingress", "delete", "gone"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        stderr(&again),
        "error: not_found: tcp ingress \"gone\" does not exist\n"
    );
}

#[test]
fn the_token_comes_from_a_flag_or_a_file() {
    let dir = TempDir::new("ctltok");
    let token = "ctl-token-0123456789abcdef";
    let d = Daemon::start_with(dir.path(), &[("INGRESSD_API_TOKEN", token)], &[]);

    let without = d.ctl_output(&["instance", "list"]);
    assert_eq!(without.status.code(), Some(1));
    assert_eq!(
        stderr(&without),
        "error: unauthorized: missing or wrong bearer token\n"
    );
    let wrong = d.ctl_output(&["--token", "not-it", "instance", "list"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert_eq!(stderr(&wrong), stderr(&without));

    d.ctl(&["--token", token, "instance", "put", "db", "127.0.0.1"]);
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let listed = d.ctl(&["--token-file", file.to_str().unwrap(), "instance", "list"]);
    assert_eq!(listed, "NAME  ADDRESS\ndb    127.0.0.1\n");

    let unreadable = dir.path().join("absent");
    let out = d.ctl_output(&[
        "--token-file",
        unreadable.to_str().unwrap(),
        "instance",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("error: {}: ", unreadable.display())),
        "{}",
        stderr(&out)
    );
}
