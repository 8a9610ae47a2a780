#!/usr/bin/env python3
"""Socket behaviour cases for `cargo xtask compat`, written as ordinary applications write them.

    cases.py server CASE PORT          # serves until killed; prints {"listening": PORT}
    cases.py client CASE HOST PORT     # prints one JSON line: what the application saw

The client's JSON is what is compared between a run with Weft off and a run with Weft on: the
same bytes (as sha256), the same errors, in the same time bounds. Nothing here retries an error
a real application would not retry.
"""
import errno, hashlib, json, os, selectors, socket, struct, sys, threading, time

CHUNK = 64 * 1024


def pattern(n, seed=0):
    """n deterministic bytes."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    while len(out) < n:
        out += block
    return bytes(out[:n])


def err_name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e, OSError) and e.errno else type(e).__name__


def listener(port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(512)
    print(json.dumps({"listening": port}), flush=True)
    return s


def serve_forever(port, handler, family=socket.AF_INET, delay_accept=0.0):
    ls = listener(port, family)
    while True:
        if delay_accept:
            time.sleep(delay_accept)
        c, _ = ls.accept()
        threading.Thread(target=guard, args=(handler, c), daemon=True).start()


def guard(handler, c):
    try:
        handler(c)
    except OSError:
        pass
    finally:
        try:
            c.close()
        except OSError:
            pass


def recv_all(c):
    data = bytearray()
    while True:
        d = c.recv(CHUNK)
        if not d:
            return bytes(data)
        data += d


# --- servers ----------------------------------------------------------------------------------

def echo(c):
    """Blocking echo until EOF, then close."""
    while True:
        d = c.recv(CHUNK)
        if not d:
            c.shutdown(socket.SHUT_WR)
            return
        c.sendall(d)


def digest_reply(c):
    """Reads to EOF, answers with the sha256 and length of what it read."""
    data = recv_all(c)
    c.sendall(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}).encode())
    c.shutdown(socket.SHUT_WR)


def splice_digest(c):
    """Reads with splice(2) into a pipe (Go's io.Copy, haproxy and nginx do), to EOF."""
    r, w = os.pipe()
    h, n = hashlib.sha256(), 0
    try:
        while True:
            k = os.splice(c.fileno(), w, CHUNK)
            if k == 0:
                break
            got = os.read(r, k)
            h.update(got)
            n += len(got)
    finally:
        os.close(r)
        os.close(w)
    c.sendall(json.dumps({"sha256": h.hexdigest(), "bytes": n}).encode())
    c.shutdown(socket.SHUT_WR)


def sendfile_server(c):
    """Sends a file with sendfile(2), then closes."""
    path = "/tmp/weft-compat-sendfile"
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(pattern(8 << 20, 7))
        os.rename(path + ".tmp", path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            off += os.sendfile(c.fileno(), f.fileno(), off, size - off)
    c.shutdown(socket.SHUT_WR)
    recv_all(c)


def delayed_reply(c):
    """Reads the request to EOF (the client half-closes), waits, then replies."""
    data = recv_all(c)
    time.sleep(0.02)
    c.sendall(b"reply:" + str(len(data)).encode())


def rst_server(c):
    """Reads a little, then aborts with RST (SO_LINGER 0)."""
    c.recv(16)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def peek_server(c):
    """Sends 'hello world' in one write, then waits for the client to close."""
    c.sendall(b"hello world")
    recv_all(c)


def lowat_server(c):
    """Sends 100 bytes in 10 writes 20 ms apart."""
    for i in range(10):
        c.sendall(bytes([48 + i]) * 10)
        time.sleep(0.02)
    recv_all(c)


SERVERS = {
    "blocking_recv": echo,
    "epoll_recv": echo,
    "msg_peek": peek_server,
    "msg_waitall": lowat_server,
    "rcvlowat": lowat_server,
    "half_close": delayed_reply,
    "rst_close": rst_server,
    "big_transfer_hash": digest_reply,
    "small_writes_nodelay": digest_reply,
    "splice_reader": splice_digest,
    "sendfile_writer": sendfile_server,
    "send_before_accept": digest_reply,
    "v4_mapped_v6_socket": echo,
    "python_blocking": echo,
}

# --- clients ----------------------------------------------------------------------------------

def connect(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(20)
    addr = ("::ffff:" + host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    s.connect(addr)
    return s


def c_blocking_recv(host, port, conns=300):
    """Blocking full duplex: a writer thread sends while the main thread recv()s (no timeout:
    a truly blocking socket)."""
    ok, errors = 0, {}
    for i in range(conns):
        s = socket.socket()
        s.connect((host, port))
        data = pattern(32 * 1024, i)
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        got = bytearray()
        try:
            while True:
                d = s.recv(CHUNK)
                if not d:
                    break
                got += d
            ok += bytes(got) == data
        except OSError as e:
            errors[err_name(e)] = errors.get(err_name(e), 0) + 1
        t.join()
        s.close()
    return {"ok": ok, "of": conns, "errors": errors}


def c_epoll_recv(host, port, conns=100):
    ok, errors = 0, {}
    for i in range(conns):
        s = socket.socket()
        s.connect((host, port))
        s.setblocking(False)
        data, sent, got = pattern(64 * 1024, i), 0, bytearray()
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        done, deadline = False, time.time() + 20
        try:
            while not done and time.time() < deadline:
                for _key, ev in sel.select(timeout=1):
                    if ev & selectors.EVENT_WRITE and sent < len(data):
                        try:
                            sent += s.send(data[sent:sent + CHUNK])
                        except BlockingIOError:
                            pass
                        if sent == len(data):
                            s.shutdown(socket.SHUT_WR)
                            sel.modify(s, selectors.EVENT_READ)
                    if ev & selectors.EVENT_READ:
                        try:
                            d = s.recv(CHUNK)
                        except BlockingIOError:
                            continue  # non-blocking: EAGAIN is an answer, poll again
                        if not d:
                            done = True
                        got += d
            ok += bytes(got) == data
        except OSError as e:
            errors[err_name(e)] = errors.get(err_name(e), 0) + 1
        sel.close()
        s.close()
    return {"ok": ok, "of": conns, "errors": errors}


def c_msg_peek(host, port):
    s = connect(host, port)
    time.sleep(0.1)
    peeked = s.recv(5, socket.MSG_PEEK)
    full = s.recv(64)
    s.close()
    return {"peeked": peeked.decode(), "then": full.decode()}


def c_msg_waitall(host, port):
    s = connect(host, port)
    got = s.recv(100, socket.MSG_WAITALL)
    s.close()
    return {"bytes": len(got), "sha256": hashlib.sha256(got).hexdigest()}


def c_rcvlowat(host, port):
    s = connect(host, port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 50)
    first = s.recv(100)
    s.close()
    # SO_RCVLOWAT: the first read returns once at least 50 bytes are there.
    return {"first_read_at_least_lowat": len(first) >= 50}


def c_half_close(host, port, conns=100):
    """Blocking client: request, shutdown(SHUT_WR), then a blocking recv() of the reply."""
    ok, errors = 0, {}
    for _ in range(conns):
        s = socket.socket()
        s.connect((host, port))
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        try:
            ok += s.recv(100) == b"reply:5"
        except OSError as e:
            errors[err_name(e)] = errors.get(err_name(e), 0) + 1
        s.close()
    return {"ok": ok, "of": conns, "errors": errors}


def c_rst_close(host, port):
    s = connect(host, port)
    s.sendall(b"x")
    time.sleep(0.2)
    try:
        got = s.recv(10)
        outcome = "eof" if got == b"" else "data"
    except OSError as e:
        outcome = err_name(e)
    s.close()
    return {"outcome": outcome}


def c_digest(host, port, size, write=CHUNK, nodelay=False, family=socket.AF_INET):
    s = connect(host, port, family)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = pattern(size, 3)
    for i in range(0, len(data), write):
        s.sendall(data[i:i + write])
    s.shutdown(socket.SHUT_WR)
    answer = json.loads(recv_all(s) or b"{}")
    s.close()
    return {"sent_sha256": hashlib.sha256(data).hexdigest(), "server": answer}


def c_sendfile_writer(host, port):
    s = connect(host, port)
    data = recv_all(s)
    s.close()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def c_v4_mapped(host, port):
    s = connect(host, port, socket.AF_INET6)
    data = pattern(256 * 1024, 5)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = recv_all(s)
    s.close()
    return {"echo_intact": got == data}


def c_python_blocking(host, port, conns=200):
    """Request/response on short blocking connections with a read timeout (common in scripts)."""
    ok, errors = 0, {}
    for i in range(conns):
        try:
            s = socket.create_connection((host, port), timeout=10)
            msg = b"ping %d\n" % i
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                d = s.recv(100)
                if not d:
                    break
                got += d
            ok += got == msg
            s.close()
        except OSError as e:
            errors[err_name(e)] = errors.get(err_name(e), 0) + 1
    return {"ok": ok, "of": conns, "errors": errors}


CLIENTS = {
    "blocking_recv": c_blocking_recv,
    "epoll_recv": c_epoll_recv,
    "msg_peek": c_msg_peek,
    "msg_waitall": c_msg_waitall,
    "rcvlowat": c_rcvlowat,
    "half_close": c_half_close,
    "rst_close": c_rst_close,
    "big_transfer_hash": lambda h, p: c_digest(h, p, 1 << 30, write=1 << 20),
    "small_writes_nodelay": lambda h, p: c_digest(h, p, 256 * 1024, write=100, nodelay=True),
    "splice_reader": lambda h, p: c_digest(h, p, 4 << 20),
    "sendfile_writer": c_sendfile_writer,
    "send_before_accept": lambda h, p: c_digest(h, p, 64 * 1024),
    "v4_mapped_v6_socket": c_v4_mapped,
    "python_blocking": c_python_blocking,
}


def main():
    role, case = sys.argv[1], sys.argv[2]
    if role == "server":
        port = int(sys.argv[3])
        family = socket.AF_INET6 if case == "v4_mapped_v6_socket" else socket.AF_INET
        delay = 0.3 if case == "send_before_accept" else 0.0
        serve_forever(port, SERVERS[case], family, delay)
    else:
        host, port = sys.argv[3], int(sys.argv[4])
        start = time.time()
        try:
            result = CLIENTS[case](host, port)
        except Exception as e:  # what the application saw, as data
            result = {"exception": err_name(e)}
        print(json.dumps({"case": case, "result": result, "secs": round(time.time() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
