//! Every endpoint's success path and every error code, through the real HTTP server.
use serde_json::json;

use crate::common::{Server, TempDir, accepts, assert_error, cert_pem, free_port, test_config};

fn rule(sni: &str, instance: &str, port: u16) -> serde_json::Value {
    json!({"match": {"sni": sni}, "target": {"instance": instance, "port": port}, "mode": "passthrough"})
}

fn ingress(name: &str, port: u16, rules: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"name": name, "listen_port": port, "rules": rules})
}

#[test]
fn resources_success_paths() {
    let dir = TempDir::new("api-okcolumn 20column 20column 20column 20column 20");
    let s = Server::start(test_config(dir.path()));

    let r = s.req("GET", "/healthz", None);
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = s.req("GET", "/readyz", None);
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("ready"))
    );

    // Instances: create (201), update (200), get, list.
    let r = s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.2"})),
    );
    assert_eq!(
        (r.status, r.json()),
        (201, json!({"name": "db", "address": "127.0.0.2"}))
    );
    let r = s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.1"})),
    );
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"name": "db", "address": "127.0.0.1"}))
    );
    let r = s.req("GET", "/instances/db", None);
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"name": "db", "address": "127.0.0.1"}))
    );
    let r = s.req("GET", "/instances", None);
    assert_eq!(
        (r.status, r.json()),
        (200, json!([{"name": "db", "address": "127.0.0.1"}]))
    );

    // Certificates: the key is never returned.
    let (cert, key) = cert_pem(&["*.pg.example.com", "db.example.com"]);
    let r = s.req(
        "POST",
        "/certificates",
        Some(json!({"name": "pg", "cert_pem": cert, "key_pem": key})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let body = r.json();
    assert_eq!(body["sans"], json!(["*.pg.example.com", "db.example.com"]));
    assert_eq!(body["chain_len"], json!(1));
    assert!(!r.text().contains("PRIVATE KEY"));
    let r = s.req("GET", "/certificates/pg", None);
    assert_eq!((r.status, r.json()), (200, body.clone()));
    let r = s.req("GET", "/certificates", None);
    assert_eq!((r.status, r.json()), (200, json!([body])));

    // Ingress create binds its listener.
    let port = free_port();
    let spec = json!({"name": "pg", "listen_port": port, "rules": [
        {"match": {"sni": "{id}.PG.example.com"}, "target": {"instance": "pg-{id}", "port": 5432}},
        {"match": {"sni": "db.example.com"}, "target": {"instance": "db", "port": 5432},
         "mode": "passthrough", "protocol": "postgres", "proxy_protocol": "v2"}],
        "default_target": {"instance": "db", "port": 5433}});
    let r = s.req("POST", "/tcp-ingresses", Some(spec));
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 20);
    assert!(
        time::OffsetDateTime::parse(
            created["created_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );
    assert_eq!(
        created,
        json!({"id": id, "name": "pg", "listen_port": port, "created_at": created["created_at"], "rules": [
            {"match": {"sni": "{id}.pg.example.com"}, "target": {"instance": "pg-{id}", "port": 5432},
             "mode": "terminate", "protocol": "tls"},
            {"match": {"sni": "db.example.com"}, "target": {"instance": "db", "port": 5432},
             "mode": "passthrough", "protocol": "postgres", "proxy_protocol": "v2"}],
            "default_target": {"instance": "db", "port": 5433, "protocol": "tls"}})
    );
    assert!(accepts(port));

    // Get by ID, name and unique prefix; list.
    for key in [id.as_str(), "pg", &id[..6]] {
        let r = s.req("GET", &format!("/tcp-ingresses/{key}"), None);
        assert_eq!((r.status, r.json()), (200, created.clone()), "{key}");
    }
    let r = s.req("GET", "/tcp-ingresses", None);
    assert_eq!((r.status, r.json()), (200, json!([created])));

    // Replace on a new port rebinds; the name stays; created_at stays.
    let port2 = free_port();
    let r = s.req(
        "PUT",
        &format!("/tcp-ingresses/{id}"),
        Some(ingress("pg", port2, vec![rule("a.example.com", "db", 1)])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["created_at"], created["created_at"]);
    assert_eq!(r.json()["listen_port"], json!(port2));
    assert!(accepts(port2));
    assert!(!accepts(port));

    // Port claims and the port table.
    let claim_port = free_port();
    let r = s.req(
        "PUT",
        &format!("/port-claims/{claim_port}"),
        Some(json!({"owner": "http-ingress"})),
    );
    assert_eq!(
        (r.status, r.json()),
        (201, json!({"port": claim_port, "owner": "http-ingress"}))
    );
    let r = s.req(
        "PUT",
        &format!("/port-claims/{claim_port}"),
        Some(json!({"owner": "http-ingress"})),
    );
    assert_eq!(r.status, 200);
    let r = s.req("GET", "/ports", None);
    assert_eq!(r.status, 200);
    let mut want = vec![
        json!({"port": 2019, "kind": "reserved", "owner": "reserved"}),
        json!({"port": 2222, "kind": "reserved", "owner": "reserved"}),
        json!({"port": s.addr.port(), "kind": "reserved", "owner": "api"}),
        json!({"port": claim_port, "kind": "claim", "owner": "http-ingress"}),
        json!({"port": port2, "kind": "tcp_ingress", "owner": "pg", "ingress_id": id, "bound": true}),
    ];
    want.sort_by_key(|v| v["port"].as_u64());
    assert_eq!(r.json(), json!(want));
    let r = s.req("DELETE", &format!("/port-claims/{claim_port}"), None);
    assert_eq!((r.status, r.body.len()), (204, 0));

    // Deletes.
    let r = s.req("DELETE", "/tcp-ingresses/pg", None);
    assert_eq!((r.status, r.body.len()), (204, 0));
    assert!(!accepts(port2));
    assert_eq!(s.req("DELETE", "/certificates/pg", None).status, 204);
    assert_eq!(s.req("DELETE", "/instances/db", None).status, 204);
    assert_eq!(s.req("GET", "/tcp-ingresses", None).json(), json!([]));
    assert_eq!(s.req("GET", "/instances", None).json(), json!([]));
    assert_eq!(s.req("GET", "/certificates", None).json(), json!([]));

    let r = s.req("GET", "/openapi.json", None);
    assert_eq!(r.status, 200);
    assert!(r.json()["paths"]["/tcp-ingresses/{id}"]["put"].is_object());
}

#[test]
fn request_shape_errors() {
    let dir = TempDir::new("api-shape");
    let s = Server::start(test_config(dir.path()));
    let c = s.client();
    let json_ct = [("Content-Type", "application/json")];

    let r = c
        .send("POST", "/tcp-ingresses", &json_ct, Some(b"{"))
        .unwrap();
    assert_error(
        &r,
        400,
        "bad_request",
        "invalid JSON body: EOF while parsing an object at line 1 column 1",
    );
    let r = c
        .send("POST", "/tcp-ingresses", &json_ct, Some(b"{}"))
        .unwrap();
    assert_error(
        &r,
        400,
        "bad_request",
        "invalid JSON body: missing field `name` at line 1 column 2",
    );
    let r = c
        .send(
            "POST",
            "/instances/a",
            &json_ct,
            Some(b"{\"address\": \"127.0.0.1\"} x"),
        )
        .unwrap();
    assert_error(
        &r,
        405,
        "method_not_allowed",
        "method POST is not allowed on /instances/a",
    );
    let r = c
        .send(
            "PUT",
            "/instances/a",
            &json_ct,
            Some(b"{\"address\": \"127.0.0.1\"} x"),
        )
        .unwrap();
    assert_error(
        &r,
        400,
        "bad_request",
        "invalid JSON body: trailing characters at line 1 column 26",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(json!({"name": "a", "listen_port": "x"})),
    );
    assert_error(
        &r,
        400,
        "bad_request",
        "listen_port: invalid type: string \"x\", expected u16 at line 1 column 18",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(json!({"name": "a", "listen_port": 70000})),
    );
    assert_error(
        &r,
        400,
        "bad_request",
        "listen_port: invalid value: integer `70000`, expected u16 at line 1 column 20",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(json!({"listen_port": 1, "name": "a", "colour": 1})),
    );
    assert_error(
        &r,
        400,
        "bad_request",
        "colour: unknown field `colour`, expected one of `name`, `listen_port`, `rules`, `default_target`, `idle_timeout_secs` at line 1 column 9",
    );
    let r = s.req("POST", "/tcp-ingresses", Some(json!({"name": "a", "listen_port": 1, "rules": [{"match": {"sni": "a.b"}, "target": {"instance": "c", "port": 1}, "mode": "tunnel"}]})));
    assert_error(
        &r,
        400,
        "bad_request",
        "rules[0].mode: unknown variant `tunnel`, expected `terminate` or `passthrough` at line 1 column 75",
    );
    let r = c.send("POST", "/tcp-ingresses", &[], Some(b"{}")).unwrap();
    assert_error(
        &r,
        400,
        "bad_request",
        "Content-Type must be application/json",
    );
    let r = s.req("PUT", "/port-claims/http", Some(json!({"owner": "x"})));
    assert_error(
        &r,
        400,
        "bad_request",
        "port: \"http\" is not a port number (1-65535)",
    );
    let r = s.req("PUT", "/port-claims/0", Some(json!({"owner": "x"})));
    assert_error(
        &r,
        400,
        "bad_request",
        "port: \"0\" is not a port number (1-65535)",
    );
    let r = s.req("PUT", "/instances/x", Some(json!({"address": "nowhere"})));
    assert_error(
        &r,
        400,
        "bad_request",
        "address: invalid IP address syntax at line 1 column 20",
    );

    let big = vec![b' '; 70 * 1024];
    let r = c
        .send("POST", "/tcp-ingresses", &json_ct, Some(&big))
        .unwrap();
    assert_error(&r, 413, "too_large", "request body exceeds the size limit");

    let r = s.req("GET", "/nope", None);
    assert_error(&r, 404, "not_found", "no route for /nope");
    let r = s.req("PATCH", "/tcp-ingresses", None);
    assert_error(
        &r,
        405,
        "method_not_allowed",
        "method PATCH is not allowed on /tcp-ingresses",
    );
    let r = s.req("POST", "/ports", None);
    assert_error(
        &r,
        405,
        "method_not_allowed",
        "method POST is not allowed on /ports",
    );
}

#[test]
fn validation_and_conflict_errors() {
    let dir = TempDir::new("api-conflict");
    let s = Server::start(test_config(dir.path()));
    s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.1"})),
    );

    let p = free_port();
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("Bad_Name", p, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        400,
        "invalid_name",
        "name: \"Bad_Name\" must match ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ (1-63 characters)",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", p, vec![rule("pg-{id}.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        400,
        "invalid_pattern",
        "rules[0].match.sni: capture in \"pg-{id}\" must occupy a whole label",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress(
            "a",
            p,
            vec![rule("{id}.example.com", "pg-{name}", 1)],
        )),
    );
    assert_error(
        &r,
        400,
        "invalid_pattern",
        "rules[0].target.instance: uses {name}, which the SNI pattern does not capture",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", p, vec![rule("a.example.com", "ghost", 1)])),
    );
    assert_error(
        &r,
        400,
        "instance_not_found",
        "rules[0].target.instance: instance \"ghost\" does not exist",
    );
    let mut spec = ingress("a", p, vec![rule("a.example.com", "db", 1)]);
    spec["rules"][0]["mode"] = json!("terminate");
    let r = s.req("POST", "/tcp-ingresses", Some(spec));
    assert_error(
        &r,
        400,
        "no_certificate",
        "rules[0].match.sni: no stored certificate covers \"a.example.com\" (mode terminate)",
    );
    let api = s.addr.port();
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", p, vec![rule("a.example.com", "db", api)])),
    );
    assert_error(
        &r,
        400,
        "backend_not_allowed",
        &format!("rules[0].target: instance \"db\" at 127.0.0.1:{api} is the API's own address"),
    );
    let r = s.req(
        "PUT",
        "/instances/meta",
        Some(json!({"address": "169.254.169.254"})),
    );
    assert_error(
        &r,
        400,
        "backend_not_allowed",
        "address: 169.254.169.254 is link-local, which is never allowed",
    );
    let r = s.req("PUT", "/instances/far", Some(json!({"address": "8.8.8.8"})));
    assert_error(
        &r,
        400,
        "backend_not_allowed",
        "address: 8.8.8.8 is outside backend_allow",
    );
    let r = s.req(
        "POST",
        "/certificates",
        Some(json!({"name": "c", "cert_pem": "x", "key_pem": "y"})),
    );
    assert_error(
        &r,
        400,
        "invalid_certificate",
        "cert_pem: no CERTIFICATE block",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress(
            "a",
            p,
            vec![
                rule("{a}.example.com", "db", 1),
                rule("{b}.example.com", "db", 2),
            ],
        )),
    );
    assert_error(
        &r,
        409,
        "sni_conflict",
        "rules[1].match.sni: \"{b}.example.com\" can match the same hostname as rules[0] (\"{a}.example.com\")",
    );

    // Ports: reserved, the API's own, claimed, another ingress's, another process's.
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", 2019, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        409,
        "port_reserved",
        "listen_port: port 2019 is reserved (RESERVED_PORTS)",
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", api, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        409,
        "port_reserved",
        &format!("listen_port: port {api} is the API's own port"),
    );
    let r = s.req("PUT", "/port-claims/2222", Some(json!({"owner": "x"})));
    assert_error(
        &r,
        409,
        "port_reserved",
        "port: port 2222 is reserved (RESERVED_PORTS)",
    );
    let claimed = free_port();
    assert_eq!(
        s.req(
            "PUT",
            &format!("/port-claims/{claimed}"),
            Some(json!({"owner": "http-ingress"}))
        )
        .status,
        201
    );
    let r = s.req(
        "PUT",
        &format!("/port-claims/{claimed}"),
        Some(json!({"owner": "other"})),
    );
    assert_error(
        &r,
        409,
        "already_exists",
        &format!("port: port {claimed} is already claimed by \"http-ingress\""),
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("a", claimed, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        409,
        "port_in_use",
        &format!("listen_port: port {claimed} is claimed by \"http-ingress\""),
    );
    assert_eq!(
        s.req(
            "POST",
            "/tcp-ingresses",
            Some(ingress("a", p, vec![rule("a.example.com", "db", 1)]))
        )
        .status,
        201
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress(
            "a",
            free_port(),
            vec![rule("a.example.com", "db", 1)],
        )),
    );
    assert_eq!(r.json()["code"], json!("already_exists"));
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("name: tcp ingress \"a\" already exists (id ")
    );
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("b", p, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        409,
        "port_in_use",
        &format!("listen_port: port {p} is used by tcp ingress \"a\""),
    );
    let r = s.req(
        "PUT",
        &format!("/port-claims/{p}"),
        Some(json!({"owner": "x"})),
    );
    assert_error(
        &r,
        409,
        "port_in_use",
        &format!("port: port {p} is used by tcp ingress \"a\""),
    );
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fp = foreign.local_addr().unwrap().port();
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress("b", fp, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        409,
        "port_in_use",
        &format!(
            "listen_port: 127.0.0.1:{fp} is already in use by {} (pid {})",
            std::fs::read_to_string("/proc/self/comm").unwrap().trim(),
            std::process::id()
        ),
    );
    let r = s.req(
        "PUT",
        "/tcp-ingresses/a",
        Some(ingress("renamed", p, vec![rule("a.example.com", "db", 1)])),
    );
    assert_error(
        &r,
        400,
        "bad_request",
        "name: cannot change the name of tcp ingress \"a\"; create a new one",
    );

    // Certificates: duplicates and deleting one a terminate rule needs.
    let (cert, key) = cert_pem(&["t.example.com"]);
    let body = json!({"name": "t", "cert_pem": cert, "key_pem": key});
    assert_eq!(
        s.req("POST", "/certificates", Some(body.clone())).status,
        201
    );
    let r = s.req("POST", "/certificates", Some(body));
    assert_error(
        &r,
        409,
        "already_exists",
        "name: certificate \"t\" already exists",
    );
    let mut spec = ingress("term", free_port(), vec![rule("T.example.com", "db", 1)]);
    spec["rules"][0]["mode"] = json!("terminate");
    assert_eq!(s.req("POST", "/tcp-ingresses", Some(spec)).status, 201);
    let r = s.req("DELETE", "/certificates/t", None);
    assert_error(
        &r,
        409,
        "in_use",
        "certificate \"t\" is the only one covering \"t.example.com\" (tcp ingress \"term\", rules[0])",
    );

    // Not found.
    for (path, msg) in [
        ("/tcp-ingresses/zzz", "tcp ingress \"zzz\" does not exist"),
        ("/instances/zzz", "instance \"zzz\" does not exist"),
        ("/certificates/zzz", "certificate \"zzz\" does not exist"),
    ] {
        assert_error(&s.req("GET", path, None), 404, "not_found", msg);
        assert_error(&s.req("DELETE", path, None), 404, "not_found", msg);
    }
    assert_error(
        &s.req("DELETE", "/port-claims/4444", None),
        404,
        "not_found",
        "port claim 4444 does not exist",
    );
}

#[test]
fn ambiguous_prefixes_and_internal_errors() {
    let dir = TempDir::new("api-ambiguous");
    let s = Server::start(test_config(dir.path()));
    s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.1"})),
    );
    // Among 17 IDs two share their first hex digit.
    let mut ids: Vec<String> = Vec::new();
    let shared = loop {
        let r = s.req(
            "POST",
            "/tcp-ingresses",
            Some(ingress(
                &format!("i{}", ids.len()),
                free_port(),
                vec![rule("a.example.com", "db", 1)],
            )),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_owned();
        if let Some(other) = ids.iter().find(|o| o[..1] == id[..1]) {
            break (other.clone(), id);
        }
        ids.push(id);
    };
    let prefix = &shared.0[..1];
    let r = s.req("GET", &format!("/tcp-ingresses/{prefix}"), None);
    assert_error(
        &r,
        409,
        "ambiguous",
        &format!("id: \"{prefix}\" is a prefix of several tcp ingress IDs"),
    );
    let r = s.req("DELETE", &format!("/tcp-ingresses/{prefix}"), None);
    assert_eq!(r.json()["code"], json!("ambiguous"));

    // A store that cannot be written answers 500 internal_error and changes nothing.
    let instances = dir.path().join("instances");
    std::fs::remove_dir_all(&instances).unwrap();
    std::fs::write(&instances, b"not a directory").unwrap();
    let r = s.req("PUT", "/instances/x", Some(json!({"address": "127.0.0.3"})));
    assert_error(
        &r,
        500,
        "internal_error",
        &format!(
            "writing instance: writing {}/x.json: Not a directory (os error 20)",
            instances.display()
        ),
    );
    assert_error(
        &s.req("GET", "/instances/x", None),
        404,
        "not_found",
        "instance \"x\" does not exist",
    );
}

#[test]
fn bearer_token_guards_everything_but_health() {
    let dir = TempDir::new("api-auth");
    let mut config = test_config(dir.path());
    config.api_token = Some("s3cret-token".into());
    let s = Server::start(config);
    let anon = s.anonymous();
    for path in [
        "/tcp-ingresses",
        "/ports",
        "/instances",
        "/certificates",
        "/openapi.json",
        "/nope",
    ] {
        let r = anon.send("GET", path, &[], None).unwrap();
        assert_error(&r, 401, "unauthorized", "missing or wrong bearer token");
    }
    let r = anon
        .send("GET", "/ports", &[("Authorization", "Bearer wrong")], None)
        .unwrap();
    assert_error(&r, 401, "unauthorized", "missing or wrong bearer token");
    let r = anon
        .send(
            "GET",
            "/ports",
            &[("Authorization", "Basic s3cret-token")],
            None,
        )
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(anon.send("GET", "/healthz", &[], None).unwrap().status, 200);
    assert_eq!(anon.send("GET", "/readyz", &[], None).unwrap().status, 200);
    assert_eq!(s.req("GET", "/ports", None).status, 200);
    let r = anon
        .send(
            "GET",
            "/ports",
            &[("Authorization", "bearer s3cret-token")],
            None,
        )
        .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn alpn_is_stored_as_given_and_each_bad_list_is_refused() {
    let dir = TempDir::new("api-alpn");
    let s = Server::start(test_config(dir.path()));
    s.req(
        "PUT",
        "/instances/db",
        Some(json!({"address": "127.0.0.1"})),
    );
    let (cert, key) = cert_pem(&["*.example.com"]);
    let r = s.req(
        "POST",
        "/certificates",
        Some(json!({"name": "c", "cert_pem": cert, "key_pem": key})),
    );
    assert_eq!(r.status, 201);
    let terminate = |sni: &str, alpn: serde_json::Value| {
        let mut r = rule(sni, "db", 1);
        r["mode"] = json!("terminate");
        if !alpn.is_null() {
            r["alpn"] = alpn;
        }
        r
    };
    let p = free_port();
    let refused = |rule: serde_json::Value, message: &str| {
        let r = s.req("POST", "/tcp-ingresses", Some(ingress("a", p, vec![rule])));
        assert_error(&r, 400, "bad_request", message);
    };
    let mut passthrough = rule("a.example.com", "db", 1);
    passthrough["alpn"] = json!(["h2"]);
    refused(
        passthrough,
        "rules[0].alpn: only a terminate rule negotiates ALPN; remove it from a passthrough rule",
    );
    refused(
        terminate("a.example.com", json!([])),
        "rules[0].alpn: must list 1-8 protocol names",
    );
    refused(
        terminate(
            "a.example.com",
            json!(["a", "b", "c", "d", "e", "f", "g", "h", "i"]),
        ),
        "rules[0].alpn: must list 1-8 protocol names",
    );
    refused(
        terminate("a.example.com", json!(["h2", ""])),
        "rules[0].alpn[1]: must be 1-255 bytes of printable ASCII",
    );
    refused(
        terminate("a.example.com", json!(["x".repeat(256)])),
        "rules[0].alpn[0]: must be 1-255 bytes of printable ASCII",
    );
    refused(
        terminate("a.example.com", json!(["h\u{7f}"])),
        "rules[0].alpn[0]: must be 1-255 bytes of printable ASCII",
    );
    refused(
        terminate("a.example.com", json!(["h\u{e9}"])),
        "rules[0].alpn[0]: must be 1-255 bytes of printable ASCII",
    );
    refused(
        terminate("a.example.com", json!(["h2", "http/1.1", "h2"])),
        "rules[0].alpn[2]: \"h2\" is listed twice",
    );
    let mut pg = terminate("a.example.com", json!(["h2"]));
    pg["protocol"] = json!("postgres");
    refused(
        pg,
        "rules[0].alpn: a postgres rule must offer \"postgresql\"",
    );
    // Not a list: the body does not deserialise.
    let r = s.req(
        "POST",
        "/tcp-ingresses",
        Some(ingress(
            "a",
            p,
            vec![terminate("a.example.com", json!("h2"))],
        )),
    );
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (400, json!("bad_request"))
    );

    // Accepted lists come back as given; a rule without one has no `alpn` key.
    let mut pg = terminate("pg.example.com", json!(["postgresql", "x-pg"]));
    pg["protocol"] = json!("postgres");
    let name255 = "x".repeat(255);
    let rules = vec![
        terminate("a.example.com", json!(["h2", "http/1.1"])),
        terminate("b.example.com", serde_json::Value::Null),
        pg,
        terminate("c.example.com", json!([name255, " ~"])),
    ];
    let r = s.req("POST", "/tcp-ingresses", Some(ingress("a", p, rules)));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["rules"][0]["alpn"], json!(["h2", "http/1.1"]));
    assert!(body["rules"][1].get("alpn").is_none(), "{body}");
    assert_eq!(body["rules"][2]["alpn"], json!(["postgresql", "x-pg"]));
    let r = s.req("GET", "/tcp-ingresses/a", None);
    assert_eq!(r.json()["rules"], body["rules"]);
}
