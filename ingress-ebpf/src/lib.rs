//! Marker library so the daemon can declare a build dependency on this crate (cargo then
//! rebuilds the daemon when it changes); the programs themselves are in the `ingress-ebpf` binary.
#![no_std]
