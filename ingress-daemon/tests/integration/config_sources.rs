//! Where the real binary takes its configuration from: file < environment < command line, and a
//! bad file key or flag stops it with status 64 and one line.
use std::process::Command;

use serde_json::json;

use crate::common::TempDir;
use crate::ingressd::{BIN, Daemon};

#[test]
fn a_flag_overrides_the_environment_which_overrides_the_file() {
    let dir = TempDir::new("sources");
    let (from_file, from_env, from_flag) = (
        dir.path().join("file-data"),
        dir.path().join("env-data"),
        dir.path().join("flag-data"),
    );
    let file = dir.path().join("ingressd.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nreserved_ports = [1001]\noffload = \"required\"\n\
             api_max_body_bytes = 1024\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let d = Daemon::start_with(
        &from_env,
        &[
            ("INGRESSD_CONFIG", file.to_str().unwrap()),
            ("RESERVED_PORTS", "1002"),
            // Over the file's `required` (which would load the eBPF program or not start).
            ("INGRESSD_OFFLOAD", "off"),
        ],
        &[
            "--reserved-ports",
            "1003",
            "--data-dir",
            from_flag.to_str().unwrap(),
        ],
    );
    let c = d.client();
    let reserved: Vec<u64> = c
        .call("GET", "/ports", None)
        .unwrap()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["owner"] == "reserved")
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(reserved, vec![1003], "the flag wins over env and file");
    let ready = c.send("GET", "/readyz", &[], None).unwrap().json();
    assert_eq!(
        ready["components"]["data_path"]["detail"]["splice_path"],
        json!("userspace"),
        "the environment's offload wins over the file's: {ready}"
    );
    assert_eq!(ready["data_dir"], json!(from_flag.to_str().unwrap()));
    assert!(from_flag.join("api.addr").is_file());
    assert!(!from_env.exists() && !from_file.exists());
    // A key set only in the file still applies.
    let big = json!({"name": "x".repeat(2048)}).to_string();
    let resp = c
        .send(
            "POST",
            "/tcp-ingresses",
            &[("Content-Type", "application/json")],
            Some(big.as_bytes()),
        )
        .unwrap();
    assert_eq!(
        (resp.status, resp.json()["code"].clone()),
        (413, json!("too_large")),
        "api_max_body_bytes from the file"
    );
}

#[test]
fn a_bad_file_key_or_flag_exits_64_with_one_line() {
    let dir = TempDir::new("badsrc");
    let file = dir.path().join("ingressd.toml");
    std::fs::write(&file, "data_dir = \"/tmp\"\nmax_flow = 5\n").unwrap();
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(BIN)
            .env_clear()
            .env("INGRESSD_DATA_DIR", dir.path())
            .env("INGRESSD_API_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    let path = file.to_str().unwrap();
    let (code, stderr) = run(&[("INGRESSD_CONFIG", path)], &[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("ingressd: config file {path}: "))
            && stderr.contains("unknown field `max_flow`"),
        "{stderr}"
    );
    // The same file named by --config.
    assert_eq!(run(&[], &["--config", path]), (code, stderr));

    assert_eq!(
        run(&[], &["--max-flows", "5"]),
        (
            Some(64),
            "ingressd: command line: unexpected argument '--max-flows' found\n".to_owned()
        )
    );
    assert_eq!(
        run(&[], &["--offload", "sometimes"]),
        (
            Some(64),
            "ingressd: configuration: unknown variant `sometimes`, expected one of `auto`, `off`, `required` in `offload`\n"
                .to_owned()
        )
    );
}
