"""Sends one post-quantum (X25519MLKEM768) ClientHello to 127.0.0.1:PORT.

Needs pyOpenSSL on a `cryptography` wheel that bundles OpenSSL >= 3.5, whose default groups
offer X25519MLKEM768 first. Used by the hello capture test when INGRESSD_PQ_PYTHON names a
Python with that module.
"""
import socket
import sys

from OpenSSL import SSL

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), sock)
conn.set_tlsext_host_name(b"pq.example.test")
conn.set_alpn_protos([b"h2", b"http/1.1"])
conn.set_connect_state()
try:
    conn.do_handshake()
except (SSL.Error, OSError):
    pass
