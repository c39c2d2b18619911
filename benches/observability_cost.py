#!/usr/bin/env python3
"""Instructions per connection spent by ingressd, counted by callgrind.

Runs `ingressd` under `valgrind --tool=callgrind`, makes one passthrough ingress to an echo
backend on 127.0.0.1, warms up, then counts the daemon's instructions (all threads) over N
passthrough flows (ClientHello + 64 bytes echoed, closed with FIN) and over N refused
connections (unknown SNI). Counters are zeroed and dumped around each window with
`callgrind_control`, so start-up is not counted; what the daemon runs when idle over a window as
long (timers, periodic wake-ups) is measured right after and subtracted, and reported as
`idle_instructions_per_second`. Instruction counts do not depend on machine
load, which is why this measures them rather than time.

    python3 benches/observability_cost.py BINARY [--access-log off|stderr|FILE] [--offload MODE]
        [--connections N] [--relay-first-ms MS]

Compare a build without metrics and access log against one with them, or one build with
`--access-log off` and `--access-log FILE`.
"""

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

DEADLINE_S = 120


def echo_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)

    def serve(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def client_hello(sni):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_until(what, check):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def api(addr, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flow(port, hello):
    with socket.create_connection(("127.0.0.1", port)) as s:
        payload = hello + bytes(64)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("flow closed early")
            got += chunk
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def refusal(port, hello):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(hello)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass


def total_ir(out_dir, before):
    dumps = sorted(set(os.listdir(out_dir)) - before)
    total = 0
    for name in dumps:
        with open(os.path.join(out_dir, name)) as f:
            for line in f:
                m = re.match(r"(?:summary|totals): (\d+)", line)
                if m:
                    total += int(m.group(1))
                    break
    return total, dumps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--access-log", default="off")
    ap.add_argument("--offload", default="required")
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument(
        "--relay-first-ms",
        type=int,
        help="INGRESSD_RELAY_FIRST_MS (0: kernel path from the first byte; the daemon's "
        "default otherwise; under callgrind a flow lasts far longer than natively)",
    )
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="ingressd-cost-")
    out_dir = os.path.join(work, "callgrind")
    os.mkdir(out_dir)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "INGRESSD_DATA_DIR": os.path.join(work, "data"),
        "INGRESSD_API_LISTEN": "127.0.0.1:0",
        "INGRESSD_LISTEN_ADDR": "127.0.0.1",
        "INGRESSD_OFFLOAD": args.offload,
        "INGRESSD_ACCESS_LOG": args.access_log,
        "RUST_LOG": "info",
    }
    if args.relay_first_ms is not None:
        env["INGRESSD_RELAY_FIRST_MS"] = str(args.relay_first_ms)
    log_path = os.path.join(work, "ingressd.log")
    log = open(log_path, "w")
    daemon = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=no",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
            args.binary,
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        def api_addr():
            with open(log_path) as f:
                m = re.search(r"api listening addr=(\S+)", f.read())
                return m and m.group(1)

        addr = wait_until("the api", api_addr)
        echo = echo_server()
        port = free_port()
        api(addr, "PUT", "/instances/echo", {"address": "127.0.0.1"})
        api(addr, "POST", "/tcp-ingresses", {
            "name": "cost", "listen_port": port,
            "rules": [{"match": {"sni": "echo.cost.test"},
                       "target": {"instance": "echo", "port": echo},
                       "mode": "passthrough"}]})
        good, bad = client_hello("echo.cost.test"), client_hello("nope.cost.test")

        def idle():
            ready = api(addr, "GET", "/readyz")
            return ready["components"]["data_path"]["detail"]["flows"] == 0

        def window(work):
            """Instructions the daemon ran (all threads) while `work` ran, and for how long."""
            subprocess.run(["callgrind_control", "-z", str(daemon.pid)], check=True,
                           capture_output=True)
            before = set(os.listdir(out_dir))
            started = time.monotonic()
            work()
            wait_until("flows to end", idle)
            took = time.monotonic() - started
            subprocess.run(["callgrind_control", "-d", str(daemon.pid)], check=True,
                           capture_output=True)
            total, _ = wait_until("the dump", lambda: (lambda r: r if r[0] else None)(
                total_ir(out_dir, before)))
            return total, took

        results = {}
        idle_rates = []
        for name, run, hello in [("flow", flow, good), ("refusal", refusal, bad)]:
            for _ in range(20):  # warm-up: caches, buffer pools, lazy statics
                run(port, hello)
            wait_until("flows to end", idle)

            def connections():
                for _ in range(args.connections):
                    run(port, hello)
                time.sleep(1)  # let the last flows end before the one check

            total, took = window(connections)
            # What the daemon runs anyway over as long a time (timers, the access log's
            # periodic wake-up, the same readiness check), measured right after and taken off:
            # under callgrind a connection takes ~50 times longer than natively, which would
            # otherwise charge each one fifty times its share of time-driven work.
            quiet, quiet_took = window(lambda: time.sleep(took))
            rate = quiet / quiet_took
            idle_rates.append(rate)
            results[name] = (total - rate * took) / args.connections
        print(json.dumps({
            "binary": args.binary, "access_log": args.access_log, "offload": args.offload,
            "connections": args.connections,
            "instructions_per_flow": round(results["flow"]),
            "instructions_per_refusal": round(results["refusal"]),
            "idle_instructions_per_second": round(sum(idle_rates) / len(idle_rates)),
        }))
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main()
