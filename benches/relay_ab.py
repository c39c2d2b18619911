#!/usr/bin/env python3
"""Side-by-side bulk transfers through relay variants: throughput, system CPU, relay CPU.

Each variant relays a plaintext loopback transfer of `--bytes` one way (up: the client sends,
down: the backend sends); the variants run in turn, round after round, so a change in the
machine's load hits all of them alike. Reported per variant and direction: the median over the
rounds of the throughput, the system-wide CPU seconds per GB (`/proc/stat`, every CPU's busy
time, so softirqs and kworkers count) and the relay process's own CPU seconds per GB.

    python3 benches/relay_ab.py [--bytes N] [--rounds R] VARIANT...

A variant is one of
    relay:PATH[:BUFFER]   `splice-relay` at PATH, userspace relay, `--relay-buffer-bytes BUFFER`
    kernel:PATH[:FLAGS]   `splice-relay` at PATH, kernel path (`--offload required`, as root);
                          FLAGS is `name=value,...` for its options, e.g.
                          `soft-water-bytes=67108864`
    python:copy           a relay in this script: `recv_into` + `sendall`, 1 MiB per call
    python:splice         a relay in this script: `splice(2)` through a 1 MiB pipe

Traffic stays on 127.0.0.1.
"""

import argparse
import fcntl
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def process_seconds(pid):
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def python_relay(mode, listen, backend):
    """Runs a one-connection-at-a-time relay in this process (the `python:` variants)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen)
    listener.listen(8)
    sys.stderr.write("listening\n")
    sys.stderr.flush()

    def pump(src, dst):
        if mode == "copy":
            view = memoryview(bytearray(CHUNK))
            while n := src.recv_into(view):
                dst.sendall(view[:n])
        else:
            r, w = os.pipe()
            fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
            while n := os.splice(src.fileno(), w, CHUNK, flags=os.SPLICE_F_MOVE):
                while n:
                    n -= os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
        dst.shutdown(socket.SHUT_WR)

    while True:
        client, _ = listener.accept()
        server = socket.create_connection(backend)
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def command(variant, listen, backend):
    kind, _, rest = variant.partition(":")
    where = ["--listen", f"{listen[0]}:{listen[1]}", "--backend", f"{backend[0]}:{backend[1]}"]
    if kind == "relay":
        path, _, buffer = rest.partition(":")
        extra = ["--relay-buffer-bytes", buffer] if buffer else []
        return [path, "--offload", "off", *extra, *where]
    if kind == "kernel":
        path, _, flags = rest.partition(":")
        extra = []
        for flag in filter(None, flags.split(",")):
            name, eq, value = flag.partition("=")
            if not (name and eq and value):
                sys.exit(f"variant {variant!r}: {flag!r} is not name=value")
            extra.append(f"--{name}={value}")
        return [path, "--offload", "required", *extra, *where]
    if kind == "python" and rest in ("copy", "splice"):
        return [sys.executable, __file__, "--serve", rest, *where]
    sys.exit(f"unknown variant {variant!r}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transfer(variant, direction, size):
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    listen = ("127.0.0.1", free_port())
    relay = subprocess.Popen(command(variant, listen, sink.getsockname()), stderr=subprocess.PIPE)
    try:
        relay.stderr.readline()
        client = socket.create_connection(listen)
        server, _ = sink.accept()
        src, dst = (client, server) if direction == "up" else (server, client)
        received = [0]

        def receive():
            view = memoryview(bytearray(4 * CHUNK))
            while received[0] < size and (n := dst.recv_into(view)):
                received[0] += n

        reader = threading.Thread(target=receive)
        busy0, relay0, t0 = busy_seconds(), process_seconds(relay.pid), time.monotonic()
        reader.start()
        view = memoryview(bytearray(CHUNK))
        for _ in range(size // CHUNK):
            src.sendall(view)
        reader.join()
        t1, busy1, relay1 = time.monotonic(), busy_seconds(), process_seconds(relay.pid)
        if received[0] != size // CHUNK * CHUNK:
            sys.exit(f"{variant} {direction}: {received[0]} of {size} bytes arrived")
        client.close()
        server.close()
    finally:
        relay.terminate()
        relay.wait()
        sink.close()
    gb = size / 1e9
    return {
        "gbit_s": size * 8 / 1e9 / (t1 - t0),
        "system_cpu_s_per_gb": (busy1 - busy0) / gb,
        "relay_cpu_s_per_gb": (relay1 - relay0) / gb,
    }


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        parse = lambda a: (a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]))
        return python_relay(sys.argv[2], parse(args["--listen"]), parse(args["--backend"]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=2 << 30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    results = {(v, d): [] for v in args.variants for d in ("up", "down")}
    for _ in range(args.rounds):
        for direction in ("up", "down"):
            for variant in args.variants:
                results[variant, direction].append(transfer(variant, direction, args.bytes))
    print("| variant | direction | Gbit/s | system CPU s/GB | relay CPU s/GB |")
    print("|---|---|---|---|---|")
    for (variant, direction), runs in results.items():
        med = lambda k: statistics.median(r[k] for r in runs)
        print(
            f"| {variant} | {direction} | {med('gbit_s'):.2f} | "
            f"{med('system_cpu_s_per_gb'):.3f} | {med('relay_cpu_s_per_gb'):.3f} |"
        )


main()
