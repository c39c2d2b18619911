//! The daemon's side of the harness contract: it reports its API address and answers health
//! checks, and comes back with the same data directory after a crash.
use ingress_tests::Daemon;

#[test]
fn daemon_reports_its_api_address_and_answers_healthz() {
    let mut daemon = Daemon::start().unwrap();
    let api = daemon.api().unwrap();
    api.healthz().unwrap().assert_status(200);
    assert!(
        daemon.log().contains("ingressd api listening on"),
        "{}",
        daemon.log()
    );
    daemon.kill9().unwrap();
    daemon.restart().unwrap();
    daemon.api().unwrap().healthz().unwrap().assert_status(200);
    assert!(daemon.stop().unwrap().success(), "SIGTERM is a clean exit");
}
