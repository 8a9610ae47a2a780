//! Client programs (Python, run inside pods) shared by the tests and the benchmarks.

/// Opens keep-alive HTTP/1.1 connections one by one (a `GET /` on each) and holds those
/// answered 200; then closes them and, with `again` = 1, waits until the agent's descriptors
/// are back and opens as many again. `argv`: host, port, count, the agent's pid, again, and
/// optionally a file name: then, once holding, it prints `{"holding_now", "reset"}` and holds
/// until that file exists. Prints (last) one JSON object: `held`, `reset` (refused or reset instead of answered), the agent's
/// descriptors and resident memory (KiB) `before` / `holding` (`rss_before_kb` /
/// `rss_holding_kb`), and `after`, `held_again`, `reset_again`.
pub const HOLD_CONNECTIONS: &str = r#"
import json, os, resource, socket, sys, time
host, port, n, agent, again = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
# With a file name: once holding, print a "holding_now" line and keep holding until that file
# exists (at most a minute), so that another client can try meanwhile.
release = sys.argv[6] if len(sys.argv) > 6 else None
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
fds = lambda: len(os.listdir(f"/proc/{agent}/fd"))
def rss():
    with open(f"/proc/{agent}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
def hold(count):
    held, reset = [], 0
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=5)
        except ConnectionResetError:
            # Reset before connect() returned (its SO_ERROR check saw the reset).
            reset += 1
            continue
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            if s.recv(65536).startswith(b"HTTP/1.1 200"):
                held.append(s)
                continue
        except (ConnectionResetError, BrokenPipeError):
            pass
        reset += 1
        s.close()
    return held, reset
before, rss_before = fds(), rss()
held, reset = hold(n)
time.sleep(1)
holding, rss_holding = fds(), rss()
if release:
    print(json.dumps({"holding_now": len(held), "reset": reset}), flush=True)
    deadline = time.time() + 60
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)
for s in held:
    s.close()
result = {"before": before, "held": len(held), "reset": reset, "holding": holding,
          "rss_before_kb": rss_before, "rss_holding_kb": rss_holding}
if again:
    deadline = time.time() + 10
    while fds() > holding - len(held) and time.time() < deadline:
        time.sleep(0.1)
    result["after"] = fds()
    more, result["reset_again"] = hold(len(held))
    result["held_again"] = len(more)
print(json.dumps(result))
"#;
