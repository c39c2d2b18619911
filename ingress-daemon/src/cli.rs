//! The `ingressd` command line: the daemon's flags (the top layer of the configuration) and
//! the `ctl` and `upgrade` subcommands.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{EXIT_CONFIG, Sources};
use crate::ctl::CtlArgs;
use crate::upgrade::UpgradeArgs;

/// ingressd: an SNI-routing TCP ingress.
#[derive(Debug, Parser)]
#[command(name = "ingressd", version, about)]
pub struct Cli {
    /// TOML configuration file (overrides `INGRESSD_CONFIG`; a named file must exist).
    #[arg(long, global = false)]
    pub config: Option<PathBuf>,
    /// Directory for record files.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// API listen address, e.g. 127.0.0.1:9180.
    #[arg(long)]
    pub api_listen: Option<String>,
    /// File holding the API bearer token (mode 0600).
    #[arg(long)]
    pub api_token_file: Option<String>,
    /// Comma-separated reserved ports.
    #[arg(long)]
    pub reserved_ports: Option<String>,
    /// Kernel splice: auto, off or required.
    #[arg(long)]
    pub offload: Option<String>,
    /// Address ingress listeners bind (default `::`, dual-stack).
    #[arg(long)]
    pub listen_addr: Option<String>,
    /// Take the listeners, the API and the spliced flows over from the daemon running on the
    /// same data directory, then tell it to exit (a zero-loss upgrade).
    #[arg(long)]
    pub takeover: bool,
    /// Subcommand; without one, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run,
    /// Talk to a running daemon's API.
    Ctl(CtlArgs),
    /// Start this binary as a new daemon that takes the running one's listeners, API and
    /// spliced flows over; return once it serves (a service manager's reload command).
    Upgrade(UpgradeArgs),
}

/// A command line that does not run anything: help or version text, or a usage error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// What to print.
    pub text: String,
    /// Whether it goes to standard output (help, version) rather than standard error.
    pub to_stdout: bool,
    /// The exit status: 0 for help and version, [`EXIT_CONFIG`] for a bad command line.
    pub exit_code: u8,
}

impl Cli {
    /// Parses `args` (the program name first). A bad command line is a bad configuration: one
    /// line naming the problem and [`EXIT_CONFIG`], instead of clap's usage text and status 2.
    pub fn parse_args<I, T>(args: I) -> Result<Self, Rejected>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        use clap::error::ErrorKind;
        Self::try_parse_from(args).map_err(|e| match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Rejected {
                text: e.render().to_string(),
                to_stdout: true,
                exit_code: 0,
            },
            // `ingressd ctl` alone: the usage is the useful answer.
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Rejected {
                text: e.render().to_string(),
                to_stdout: false,
                exit_code: EXIT_CONFIG as u8,
            },
            _ => {
                let rendered = e.render().to_string();
                let first = rendered.lines().next().unwrap_or_default();
                let reason = first.strip_prefix("error: ").unwrap_or(first);
                Rejected {
                    text: format!("ingressd: command line: {reason}\n"),
                    to_stdout: false,
                    exit_code: EXIT_CONFIG as u8,
                }
            }
        })
    }

    /// The configuration layers: this command line plus the process environment.
    pub fn sources(&self) -> Sources {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let flags = [
            ("data_dir", &self.data_dir),
            ("api_listen", &self.api_listen),
            ("api_token_file", &self.api_token_file),
            ("reserved_ports", &self.reserved_ports),
            ("offload", &self.offload),
            ("listen_addr", &self.listen_addr),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect();
        Sources {
            config_file: self.config.clone(),
            env,
            flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Offload};

    fn parse(args: &[&str]) -> Cli {
        Cli::parse_args(std::iter::once("ingressd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn each_flag_sets_its_configuration_key() {
        let cli = parse(&[
            "--config",
            "/etc/ingressd.toml",
            "--data-dir",
            "/d",
            "--api-listen",
            "127.0.0.1:1",
            "--api-token-file",
            "/t",
            "--reserved-ports",
            "7,8",
            "--offload",
            "off",
            "--listen-addr",
            "127.0.0.9",
        ]);
        assert!(cli.command.is_none());
        let sources = cli.sources();
        assert_eq!(
            sources.config_file,
            Some(PathBuf::from("/etc/ingressd.toml"))
        );
        let mut flags = sources.flags;
        flags.sort();
        assert_eq!(
            flags,
            vec![
                ("api_listen", "127.0.0.1:1".to_owned()),
                ("api_token_file", "/t".to_owned()),
                ("data_dir", "/d".to_owned()),
                ("listen_addr", "127.0.0.9".to_owned()),
                ("offload", "off".to_owned()),
                ("reserved_ports", "7,8".to_owned()),
            ]
        );
        let none = parse(&[]).sources();
        assert_eq!((none.config_file, none.flags), (None, Vec::new()));
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!(
            "ingressd-cli-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ingressd.toml");
        std::fs::write(
            &file,
            "data_dir = \"/from-file\"\nreserved_ports = [1001]\noffload = \"required\"\n\
             listen_addr = \"127.0.0.2\"\n",
        )
        .unwrap();
        let file_arg = file.to_str().unwrap();
        let mut sources = parse(&[
            "--config",
            file_arg,
            "--reserved-ports",
            "1003",
            "--listen-addr",
            "127.0.0.4",
        ])
        .sources();
        sources.env = BTreeMap::from([
            ("RESERVED_PORTS".to_owned(), "1002".to_owned()),
            ("INGRESSD_OFFLOAD".to_owned(), "off".to_owned()),
            ("INGRESSD_LISTEN_ADDR".to_owned(), "127.0.0.3".to_owned()),
        ]);
        let config = Config::load(&sources).unwrap();
        // File only; environment over file; flag over both.
        assert_eq!(config.data_dir, PathBuf::from("/from-file"));
        assert_eq!(config.offload, Offload::Off);
        assert_eq!(config.reserved_ports, vec![1003]);
        assert_eq!(config.listen_addr.to_string(), "127.0.0.4");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_command_line_is_one_line_and_exit_64() {
        for args in [
            &["--bogus"][..],
            &["--data-dir"][..],
            &["extra"][..],
            &["ctl", "ingress", "frobnicate"][..],
        ] {
            let rejected = Cli::parse_args(std::iter::once("ingressd").chain(args.iter().copied()))
                .unwrap_err();
            assert_eq!(rejected.exit_code, 64, "{args:?}");
            assert!(!rejected.to_stdout, "{args:?}");
            assert!(
                rejected.text.starts_with("ingressd: command line: ")
                    && rejected.text.ends_with('\n')
                    && rejected.text.lines().count() == 1,
                "{args:?}: {:?}",
                rejected.text
            );
        }
        let bogus = Cli::parse_args(["ingressd", "--bogus"]).unwrap_err();
        assert_eq!(
            bogus.text,
            "ingressd: command line: unexpected argument '--bogus' found\n"
        );
    }

    #[test]
    fn help_and_version_go_to_stdout_with_status_0() {
        for flag in ["--help", "--version"] {
            let shown = Cli::parse_args(["ingressd", flag]).unwrap_err();
            assert_eq!((shown.exit_code, shown.to_stdout), (0, true), "{flag}");
            assert!(shown.text.contains("ingressd"), "{flag}: {}", shown.text);
        }
    }
}
