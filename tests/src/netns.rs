//! Network namespaces for tests that need a second host: a namespace joined to this one by a veth
//! pair with a /30 the test owns (`10.200.0.0/16`, one /30 per namespace), removed on drop. Root
//! only.
//!
//! Sockets can be created inside the namespace from this process ([`Netns::listen`],
//! [`Netns::connect`]: a short-lived thread enters the namespace with `setns`, creates the socket,
//! and exits; the socket stays in the namespace), and programs run there through
//! `ip netns exec` ([`Netns::command`]).
use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use crate::{
    error::{Error, IoContext as _, Result},
    ports::{lock_dir, try_lock},
    process::run_checked,
    tools,
};

/// How many /30 subnets fit in 10.200.0.0/16.
const SLOTS: u32 = 16_384;

/// A network namespace with a veth link to this one; deleted on drop.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    _lock: File,
}

impl Netns {
    /// Creates a namespace and its veth pair, both ends up, with a free /30 in 10.200.0.0/16:
    /// `.1` on this side, `.2` inside. A [`Skip`](crate::Skip) unless root with `ip` installed.
    pub fn new() -> Result<Self> {
        tools::require_root("a network namespace")?;
        tools::find("ip")?;
        let dir = lock_dir("ingress-tests-netns")?;
        for slot in 0..SLOTS {
            if let Some(lock) = try_lock(&dir, &slot.to_string())? {
                return Self::create(slot, lock);
            }
        }
        Err(Error::Process {
            what: "creating a network namespace".to_owned(),
            detail: "all slots taken".to_owned(),
        })
    }

    fn create(slot: u32, lock: File) -> Result<Self> {
        let base = slot * 4;
        let [_, _, hi, lo] = base.to_be_bytes();
        let ns = Self {
            name: format!("ingt{slot}"),
            host_if: format!("ingt{slot}h"),
            ns_if: format!("ingt{slot}n"),
            host_ip: Ipv4Addr::new(10, 200, hi, lo + 1),
            ns_ip: Ipv4Addr::new(10, 200, hi, lo + 2),
            _lock: lock,
        };
        // Leftovers of a run that crashed with this slot: ours, since we hold its lock.
        ns.cleanup();
        let (name, host_if, ns_if) = (ns.name.as_str(), ns.host_if.as_str(), ns.ns_if.as_str());
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&["netns", "add", name])?;
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name,
        ])?;
        ip(&["addr", "add", &host_cidr, "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", name, "addr", "add", &ns_cidr, "dev", ns_if])?;
        ip(&["-n", name, "link", "set", ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This side's address on the link.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace side's address on the link.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// This side's veth interface.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace side's veth interface.
    pub fn ns_if(&self) -> &str {
        &self.ns_if
    }

    /// `ip netns exec <name> <program>`: add arguments and run it inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Takes this side's end of the link down (`up = false`) or up: packets to the namespace
    /// are then silently dropped, as with a peer that vanished.
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }

    /// A TCP listener bound to `addr` inside the namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.inside(move || TcpListener::bind(addr))
            .and_then(|r| r.ctx(|| format!("binding {addr} in the namespace")))
    }

    /// A TCP connection to `addr` made from inside the namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.inside(move || TcpStream::connect_timeout(&addr, timeout))
            .and_then(|r| r.ctx(|| format!("connecting to {addr} from the namespace")))
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<io::Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        let handle = thread::spawn(move || -> io::Result<T> {
            let fd = File::open(&path)?;
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        });
        handle.join().map_err(|_| Error::Process {
            what: format!("a thread in namespace {}", self.name),
            detail: "panicked".to_owned(),
        })
    }

    fn cleanup(&self) {
        // Deleting one end of a veth pair deletes both; errors mean "already gone".
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_checked(
        &format!("ip {}", args.join(" ")),
        &mut cmd,
        Duration::from_secs(30),
    )
    .map(drop)
}
