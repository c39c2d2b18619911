//! Real clients through ingressd to real servers: `ssh` wrapped in TLS, `psql` with
//! `sslmode=verify-full` (terminate and passthrough), and `redis-cli --tls`.

use std::{process::Command, time::Duration};

use ingress_tests::{
    pki::Pki,
    ports::next_loopback,
    process::run_checked,
    require_ok,
    servers::{ServerOptions, postgres::Postgres, redis::Redis, sshd::Sshd},
    tools,
    workdir::WorkDir,
};
use serde_json::json;

use crate::common::{certificate, create_ingress, instance, kernel_daemon, postgres_rule, rule};

#[test]
fn ssh_wrapped_in_tls_logs_in_through_a_terminate_rule() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let sshd = require_ok!(Sshd::start(&ServerOptions::new(
        next_loopback(),
        &["vm1.example.test"]
    )));
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-ssh-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "vm1", &["vm1.example.test"]);
    let std::net::IpAddr::V4(ip) = sshd.addr().ip() else {
        panic!("sshd on IPv4")
    };
    instance(&api, "vm1", ip);
    let ingress = create_ingress(
        &api,
        "ssh",
        json!([rule(
            "vm1.example.test",
            "vm1",
            sshd.addr().port(),
            "terminate"
        )]),
        None,
    );
    let proxy = format!(
        "{} s_client -quiet -verify_return_error -connect {} -servername vm1.example.test \
         -verify_hostname vm1.example.test -CAfile {}",
        tools::find("openssl").unwrap().display(),
        ingress.addr(),
        ca.display()
    );
    let mut cmd = sshd.ssh_command("vm1.example.test").unwrap();
    cmd.arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .args(["vm1.example.test", "echo logged-in-as-$(id -un)"]);
    let out = run_checked("ssh over tls", &mut cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(out.trim(), format!("logged-in-as-{}", sshd.user()));
}

#[test]
fn psql_runs_select_through_terminate_and_passthrough() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let pg = require_ok!(Postgres::start(&ServerOptions::new(
        next_loopback(),
        &["db1.example.test"]
    )));
    let api = daemon.api().unwrap();
    let work = WorkDir::new("ingt-psql-").unwrap();
    let pki = Pki::new().unwrap();
    let ca = pki.write_ca(work.path()).unwrap();
    certificate(&api, &pki, "db1", &["db1.example.test"]);
    let std::net::IpAddr::V4(ip) = pg.addr().ip() else {
        panic!("postgres on IPv4")
    };
    instance(&api, "db1", ip);
    let pg_rule = |mode: &str| postgres_rule("db1.example.test", "db1", pg.addr().port(), mode);
    let passthrough = create_ingress(&api, "pg-pass", json!([pg_rule("passthrough")]), None);
    let terminate = create_ingress(&api, "pg-term", json!([pg_rule("terminate")]), None);

    // Passthrough: the TLS session is with postgres itself (its own CA verifies it).
    let got = pg
        .query_via(passthrough.addr(), "db1.example.test", "SELECT 1")
        .unwrap();
    assert_eq!(got, "1");
    let ssl = pg
        .query_via(
            passthrough.addr(),
            "db1.example.test",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .unwrap();
    assert_eq!(ssl, "t", "postgres saw TLS end to end");

    // Terminate: ingressd presents its certificate; postgres sees plaintext.
    let conninfo = format!(
        "host=db1.example.test hostaddr={} port={} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert={} connect_timeout=10",
        terminate.addr().ip(),
        terminate.addr().port(),
        ca.display()
    );
    let mut cmd = Command::new(tools::postgres_program("psql").unwrap());
    cmd.arg(&conninfo).args([
        "-Atc",
        "SELECT 1, (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
    ]);
    let got = run_checked("psql through terminate", &mut cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(
        got.trim(),
        "1|f",
        "the client used TLS to ingressd, postgres saw plaintext"
    );
}

#[test]
fn redis_cli_set_get_through_passthrough() {
    let Some(daemon) = kernel_daemon(&[]) else {
        return;
    };
    let redis = require_ok!(Redis::start(&ServerOptions::new(
        next_loopback(),
        &["cache1.example.test"]
    )));
    let api = daemon.api().unwrap();
    let std::net::IpAddr::V4(ip) = redis.tls_addr().ip() else {
        panic!("redis on IPv4")
    };
    instance(&api, "cache1", ip);
    let ingress = create_ingress(
        &api,
        "redis",
        json!([rule(
            "cache1.example.test",
            "cache1",
            redis.tls_addr().port(),
            "passthrough"
        )]),
        None,
    );
    let sni = Some("cache1.example.test");
    assert_eq!(
        redis
            .tls_command(ingress.addr(), sni, &["SET", "greeting", "hello"])
            .unwrap(),
        "OK"
    );
    assert_eq!(
        redis
            .tls_command(ingress.addr(), sni, &["GET", "greeting"])
            .unwrap(),
        "hello"
    );
}
