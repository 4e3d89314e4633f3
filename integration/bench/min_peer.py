"""The least a host can spend to move a blob over HTTP: the floor `link_floor.sh` measures.

  python3 min_peer.py serve ADDR PORT SIZE   serve SIZE random bytes from memory to every GET,
                                             1 MiB per send, at most 128 KiB unsent (as Shoal's
                                             peer sockets); print each response's CPU-s per GiB
  python3 min_peer.py fetch ADDR PORT        GET /, read the body into a 1 MiB buffer with a
                                             256 KiB receive low-water mark (as Shoal's downloads)
                                             and SHA-256 it; print CPU-s per GiB
  python3 min_peer.py relay UP_ADDR PORT ADDR START OUT [last]
                                             at START (epoch seconds) fetch from UP_ADDR:PORT as
                                             `fetch` does and pass each read on, as it arrives, to
                                             the one client that GETs ADDR:PORT (none if `last`),
                                             holding in memory what that client has not taken yet:
                                             a member of a pipelined chain (fleet.sh's `bare`
                                             system). Writes OUT.sha256, OUT.cpu ("CPU-seconds
                                             bytes") and OUT.result ("rc began end code", as
                                             fleet.sh's pulls do)

No disk, no second client, no scheduler: what is left is the kernel's TCP receive or send and
one hash, so what this costs over a shaped link against loopback is the link's own price.
"""

import collections
import hashlib
import os
import resource
import socket
import sys
import time

CHUNK = 1 << 20
RECV_LOW_WATER = 256 * 1024
NOT_SENT_LOW_WATER = 128 * 1024
TCP_NOTSENT_LOWAT = 25  # linux/tcp.h; not in Python's socket module everywhere
TIMEOUT_SECS = 120
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def response_head(length):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % length


def read_head(s, buf):
    """Read a response's head from S through BUF; return its Content-Length (None if it has
    none) and the body bytes that came with the head."""
    head = b""
    while (end := head.find(b"\r\n\r\n")) < 0:
        n = s.recv_into(buf)
        if n == 0:
            raise ValueError("the connection closed inside the response head")
        head += bytes(buf[:n])
    length = None
    for line in head[:end].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return length, head[end + 4:]


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
    print(f"ready sha256={hashlib.sha256(blob).hexdigest()}", flush=True)
    while True:
        c, _ = ls.accept()
        with c:
            c.settimeout(TIMEOUT_SECS)
            c.recv(4096)  # the request; its content does not matter
            c.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOT_SENT_LOW_WATER)
            c0 = cpu_seconds()
            c.sendall(response_head(size))
            for off in range(0, size, CHUNK):
                c.sendall(blob[off:off + CHUNK])
            c.shutdown(socket.SHUT_WR)
            c.recv(1)  # the client's close: every byte has left
            print(f"sent cpu_s_per_gib={per_gib(cpu_seconds() - c0, size):.3f}", flush=True)


def fetch(addr, port):
    c0 = cpu_seconds()
    s = socket.create_connection((addr, port), timeout=TIMEOUT_SECS)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECV_LOW_WATER)
    s.sendall(REQUEST)
    buf = memoryview(bytearray(CHUNK))
    _, first = read_head(s, buf)
    h, body = hashlib.sha256(first), len(first)
    while n := s.recv_into(buf):
        h.update(buf[:n])
        body += n
    s.close()
    print(f"received cpu_s_per_gib={per_gib(cpu_seconds() - c0, body):.3f} bytes={body} sha256={h.hexdigest()}")


def connect_when_listening(addr, port, within):
    """Connect to ADDR:PORT, trying again while nothing listens there yet (a chain's members
    start within a second of each other), for up to WITHIN seconds."""
    deadline = time.time() + within
    while True:
        try:
            return socket.create_connection((addr, port), timeout=TIMEOUT_SECS)
        except ConnectionRefusedError:
            if time.time() > deadline:
                raise
            time.sleep(0.01)


def relay(up_addr, port, addr, start, out, last):
    """One member of the chain: blocking reads from upstream into one reused buffer, each
    passed on at once with a non-blocking send; what the downstream cannot take yet is copied
    into a backlog, sent ahead of the next read's bytes, and the rest at the end. So a slower
    host further down (a straggler) does not hold back this one's receive, as a swarm agent's
    store would not, and with equal links nothing is copied: this is a plain pipe."""
    listener = None
    if not last:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((addr, port))
        listener.listen(1)
        listener.settimeout(TIMEOUT_SECS)
    time.sleep(max(0.0, start - time.time()))
    began, c0 = time.time(), cpu_seconds()
    rc, body, h, done = 1, 0, hashlib.sha256(), None
    # Bytes the downstream has not taken yet, in order: at most the blob, which the upstream's
    # Content-Length bounds.
    backlog = collections.deque()

    def forward(data):
        """Send DATA after the backlog without blocking; keep a copy of what is not taken."""
        while backlog:
            try:
                n = down.send(backlog[0])
            except BlockingIOError:
                break
            if n == len(backlog[0]):
                backlog.popleft()
            else:
                backlog[0] = backlog[0][n:]
        n = 0
        if not backlog:
            try:
                n = down.send(data)
            except BlockingIOError:
                pass
        if n < len(data):
            backlog.append(memoryview(bytes(data[n:])))

    try:
        s = connect_when_listening(up_addr, port, 5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RECV_LOW_WATER)
        s.sendall(REQUEST)
        down = None
        if listener is not None:
            down, _ = listener.accept()
            down.settimeout(TIMEOUT_SECS)
            down.recv(4096)  # the request; its content does not matter
            down.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOT_SENT_LOW_WATER)
            down.setblocking(False)
        buf = memoryview(bytearray(CHUNK))
        length, data = read_head(s, buf)
        if length is None:
            raise ValueError("no Content-Length from upstream")
        if down is not None:
            forward(response_head(length))
        while True:
            h.update(data)
            body += len(data)
            if down is not None and len(data):
                forward(data)
            n = s.recv_into(buf)
            if n == 0:
                break
            data = buf[:n]
        s.close()
        done = time.time()
        if down is not None:
            down.settimeout(TIMEOUT_SECS)
            for b in backlog:
                down.sendall(b)
            down.shutdown(socket.SHUT_WR)
            down.recv(1)  # the client's close: every byte has left
            down.close()
        rc = 0 if body == length else 1
    except (OSError, ValueError) as e:
        print(f"relay failed: {e}", file=sys.stderr)
    done = done or time.time()
    with open(out + ".sha256", "w") as f:
        f.write(f"{h.hexdigest()} *stdin\n")
    with open(out + ".cpu", "w") as f:
        f.write(f"{cpu_seconds() - c0:.3f} {body}\n")
    with open(out + ".result", "w") as f:
        f.write(f"{rc} {began:.6f} {done:.6f} {200 if rc == 0 else '000'}\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) in (7, 8) and sys.argv[1] == "relay" and sys.argv[7:] in ([], ["last"]):
        relay(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6], len(sys.argv) == 8)
    else:
        sys.exit(__doc__)
