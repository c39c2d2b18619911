//! Fuzzes the ClientHello parser: it must never panic, and its verdicts must be consistent.
//!
//! The parser file is compiled directly, without the rest of the daemon (eBPF build, tokio,
//! aya), which keeps sanitizer builds small. Seed corpus: `ingress-daemon/tests/data/hellos/`.
#![no_main]

#[allow(dead_code)]
#[path = "../../ingress-daemon/src/hello/parse.rs"]
mod parse;

use libfuzzer_sys::fuzz_target;
use parse::{DEFAULT_MAX_HELLO_BYTES, ParseError, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a cap, so small caps are explored too.
    let cap = match data.first() {
        Some(b) if b % 4 == 0 => 64 + usize::from(*b) * 8,
        _ => DEFAULT_MAX_HELLO_BYTES,
    };
    match parse_client_hello(data, cap) {
        Ok(info) => {
            assert!(info.len <= data.len() && info.len <= cap);
            // The hello is self-delimiting: its own bytes give the same answer.
            assert_eq!(parse_client_hello(&data[..info.len], cap), Ok(info.clone()));
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && !sni.bytes().any(|b| b.is_ascii_uppercase()));
            }
        }
        Err(ParseError::Incomplete { needed }) => {
            assert!(needed > data.len() && needed <= cap, "needed {needed} of {}", data.len());
        }
        Err(_) => {
            // A refusal is final: more bytes never make it acceptable.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0u8; 64]);
            assert!(!matches!(
                parse_client_hello(&longer, cap),
                Ok(_) | Err(ParseError::Incomplete { .. })
            ));
        }
    }
});
