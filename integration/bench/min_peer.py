"""The least a host can spend to move a blob over HTTP: the floor `link_floor.sh` measures.

  python3 min_peer.py serve ADDR PORT SIZE   serve SIZE random bytes from memory to every GET,
                                             1 MiB per send, at most 128 KiB unsent (as Shoal's
                                             peer sockets); print each response's CPU-s per GiB
  python3 min_peer.py fetch ADDR PORT        GET /, read the body into a 1 MiB buffer with a
                                             256 KiB receive low-water mark (as Shoal's downloads)
                                             and SHA-256 it; print CPU-s per GiB

No disk, no second client, no scheduler: what is left is the kernel's TCP receive or send and
one hash, so what this costs over a shaped link against loopback is the link's own price.
"""

import hashlib
import os
import resource
import socket
import sys

CHUNK = 1 << 20
RECV_LOW_WATER = 256 * 1024
NOT_SENT_LOW_WATER = 128 * 1024
TCP_NOTSENT_LOWAT = 25  # linux/tcp.h; not in Python's socket module everywhere
TIMEOUT_SECS = 120


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_gib(cpu, size):
    return cpu / (size / 2**30) if size else float("nan")


def serve(addr, port, size):
    blob = memoryview(os.urandom(size))
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = ls.accept()
        with c:
            c.settimeout(TIMEOUT_SECS)
            c.recv(4096)  # the request; its content does not matter
            c.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOT_SENT_LOW_WATER)
            c0 = cpu_seconds()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
            for off in range(0, size, CHUNK):
                c.sendall(blob[off:off + CHUNK])
            c.shutdown(socket.SHUT_WR)
            c.recv(1)  # the client's close: every byte has left
            print(f"sent cpu_s_per_gib={per_gib(cpu_seconds() - c0, size):.3f}", flush=True)


def fetch(addr, port):
    c0 = cpu_seconds()
    s = socket.create_connection((addr, port), timeout=TIMEOUT_SECS)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECV_LOW_WATER)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    buf = memoryview(bytearray(CHUNK))
    h, head, body = hashlib.sha256(), b"", None
    while True:
        n = s.recv_into(buf)
        if n == 0:
            break
        if body is None:
            head += bytes(buf[:n])
            end = head.find(b"\r\n\r\n")
            if end < 0:
                continue
            body = len(head) - end - 4
            h.update(head[end + 4:])
            continue
        h.update(buf[:n])
        body += n
    s.close()
    print(f"received cpu_s_per_gib={per_gib(cpu_seconds() - c0, body or 0):.3f} bytes={body} sha256={h.hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
