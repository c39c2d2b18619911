//! Skipping a test whose prerequisite is missing — except under `CI=true`, where a missing
//! prerequisite is a failure.
//!
//! ```no_run
//! use ingress_tests::{require, require_ok, servers::{ServerOptions, redis::Redis}};
//!
//! #[test]
//! fn redis_through_a_namespace() {
//!     require!(ingress_tests::is_root(), "network namespaces need root");
//!     let redis = require_ok!(Redis::start(&ServerOptions::default()));
//!     // ...
//! }
//! ```
//! libtest has no "skipped" outcome: a skipped test passes. The reason goes to stderr (shown with
//! `--nocapture`) and, when `INGRESS_TEST_SKIP_LOG` names a file (`cargo xtask test` sets it), is
//! appended there so the suite's summary lists every skip.
use std::{env, fmt, fs::OpenOptions, io::Write as _};

/// A missing prerequisite, with the reason the test cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// What is missing and how to get it.
    pub reason: String,
}

impl Skip {
    /// A skip with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prerequisite missing: {}", self.reason)
    }
}

impl std::error::Error for Skip {}

/// Whether the tests run under CI (`CI=true` or `CI=1`), where nothing may skip.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Records that the current test skips because of `reason`; panics instead under CI.
///
/// Called by [`require!`](crate::require) and [`require_ok!`](crate::require_ok).
pub fn skip_test(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    if in_ci() {
        panic!("{test}: prerequisite missing under CI=true: {reason}");
    }
    eprintln!("skipped: {reason}");
    if let Some(path) = env::var_os("INGRESS_TEST_SKIP_LOG") {
        // Best effort: a missing log must not turn a skip into a failure.
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(file, "{test}: {reason}");
        }
    }
}

/// The value a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    /// The "nothing to do" value.
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Skips the current test (returns from it) unless `cond` holds; fails it under `CI=true`.
///
/// Works in tests returning `()` and `Result<(), E>`.
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::skip::skip_test(&format!($($reason)+));
            return $crate::skip::Skipped::skipped();
        }
    };
}

/// Unwraps a harness `Result`: skips the test on [`Error::Skip`](crate::Error::Skip) (fails it
/// under `CI=true`), panics with the error on any other failure.
#[macro_export]
macro_rules! require_ok {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err($crate::Error::Skip(skip)) => {
                $crate::skip::skip_test(&skip.reason);
                return $crate::skip::Skipped::skipped();
            }
            Err(e) => panic!("{}: {e:?}", stringify!($result)),
        }
    };
}
