//! The ClientHello parser on the hellos captured from real clients
//! (`ingress-daemon/tests/data/hellos/*.bin`): whole, and as the 5-byte record header alone
//! (the `Incomplete` answer a first short peek gets).
#![forbid(unsafe_code)]

use std::{fs, hint::black_box, path::Path};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ingress_daemon::hello::{DEFAULT_MAX_HELLO_BYTES, parse_client_hello};

fn captured() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingress-daemon/tests/data/hellos");
    let mut hellos: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .filter_map(|p| {
            let name = p.file_stem()?.to_string_lossy().into_owned();
            Some((name, fs::read(&p).ok()?))
        })
        .collect();
    hellos.sort();
    hellos
}

fn parse(c: &mut Criterion) {
    let hellos = captured();
    if hellos.is_empty() {
        eprintln!("no captured hellos found: nothing to measure");
        return;
    }
    let mut group = c.benchmark_group("hello/parse");
    for (name, bytes) in &hellos {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name.as_str(), |b| {
            b.iter(|| parse_client_hello(black_box(bytes), DEFAULT_MAX_HELLO_BYTES))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("hello/incomplete");
    if let Some((name, bytes)) = hellos.iter().find(|(n, _)| n.contains("mlkem")) {
        let head = &bytes[..bytes.len().min(5)];
        group.bench_function(name.as_str(), |b| {
            b.iter(|| parse_client_hello(black_box(head), DEFAULT_MAX_HELLO_BYTES))
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
