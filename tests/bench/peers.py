#!/usr/bin/env python3
"""proxygate against its peers, side by side, on loopback.

Builds the topology from Debian and PyPI packages (installed if missing): an nginx origin;
three tinyproxy and three microsocks upstreams; squid 5 with the three tinyproxies as
round-robin parents (never_direct); haproxy in TCP mode balancing round robin over them
(one frontend over the tinyproxies, one over the microsocks); pproxy 2.7.9 with one -r per
upstream and -s rr (one instance per pool); proxygate (release build) with the same pools,
round robin. Then it runs every scenario of pg-loadgen against every gateway that speaks it,
interleaved, in two passes (the second in reverse order), and records per cell: requests per
second, latency (p50/p99 from the client), the gateway's own CPU per completed request (its
whole process tree, from /proc/PID/stat), its peak RSS, the bytes it sent to storage (its
/proc/PID/io write_bytes: proxygate's data dir), the machine's busy share, and whether
the origin's request counter agrees with what the client saw. For the scenarios of one
request's work it also splits the box's CPU per request between the gateway, the upstreams, the
origin, the client and the rest: at a saturated box the rate is about its cores over that
total, so the split says how far a cheaper gateway can raise its rate over another's. Prints
markdown tables (and writes the raw figures as JSON with --json-out).

    tests/bench/peers.py                      # 8 s per cell, two passes (~20 min)
    tests/bench/peers.py --seconds 2 --passes 1 --peers proxygate,haproxy
    tests/bench/peers.py --smoke              # 1 s per cell, one pass: CI's smoke test
    tests/bench/peers.py --threads 2          # proxygate and HAProxy on two threads each
    tests/bench/peers.py --peers proxygate,proxygate-w2,haproxy   # 1 vs 2 workers, same run
    tests/bench/peers.py --baseline /tmp/proxygate-old --peers proxygate,proxygate-base,haproxy
                                              # before/after a change, same run
    tests/bench/peers.py --instructions 2000 --peers proxygate,haproxy
                                              # user-space instructions per request (callgrind)
    tests/bench/peers.py --peers proxygate,sockmap,haproxy --scenarios in-tunnel,bulk
                                              # against tunnels joined in the kernel (root)
    tests/bench/peers.py --pool 10000 --peers proxygate,haproxy --scenarios connect
                                              # 10,000 upstream addresses per pool (root)

`--instructions N` runs each gateway under valgrind's callgrind instead and counts the
instructions it executes in user space for N requests per scenario (closed loop, after a
warm-up, counting on only while they run): a figure that does not move with the machine's
load, so a change of a few percent on the hot path shows in one run where CPU time per
request needs many passes. It leaves out the kernel's share (most of a tunnel's CPU: the same
syscalls cost every gateway the same) and cache misses.

Every gateway runs one event-loop thread by default (proxygate `server.workers = 1`, HAProxy
`nbthread 1`; squid and pproxy have one anyway): on a small box the load generator, the origin
and the upstreams share the cores, and a gateway given more threads than its peers only pays
for them in wake-ups and in its tail.

`--pool N` gives every gateway's pools N upstream addresses instead of three, spread over the
same three processes of each kind: the cost of a pool the size of a scraped list, per request
and in memory (each gateway's RSS once started, before any load, is printed per pool). The run
then moves into a network namespace of its own (`unshare --net`, root), whose only interface is
its loopback: the upstreams listen on every address there, so 127.A.B.C:PORT reaches the
process on PORT for every A.B.C, and nothing listens beyond the namespace.

Loopback only; every process it starts is stopped at the end. Run it on an otherwise idle
machine: the figures are ratios between gateways measured in the same run, and the absolute
numbers mean little on a shared, noisy box.
"""

import argparse
import errno
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# What every process here may open: the hard limit, raised when we may (root), so that 10,000
# tunnels (two descriptors each in a gateway) fit; peers are configured below it.
import resource  # noqa: E402
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200000, 200000))
except (ValueError, OSError):
    pass
FD_LIMIT = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 200000)
PAGE = os.sysconf("SC_PAGE_SIZE")

HTTP_GATEWAYS = ["proxygate", "squid", "haproxy", "pproxy"]
SOCKS_GATEWAYS = ["proxygate", "haproxy", "pproxy"]
# "sockmap" (never by default) is tests/bench/sockmap-relay.py: tunnels joined in the kernel
# by a BPF sockmap, what a relay that never wakes for a tunnel's bytes would cost the box.
# "direct" is no gateway: the client goes to one upstream itself (the first tinyproxy or
# microsocks), the baseline a gateway's added latency and throughput are measured against.

# scenario -> which pool (http: tinyproxy, socks: microsocks) and which gateways speak it
SCENARIOS = {
    "connect": ("http", HTTP_GATEWAYS + ["direct"]),
    "socks5": ("socks", SOCKS_GATEWAYS + ["direct"]),
    "in-tunnel": ("http", HTTP_GATEWAYS + ["direct", "sockmap"]),
    "keepalive": ("http", HTTP_GATEWAYS),
    "absolute-new": ("http", HTTP_GATEWAYS),
    "bulk": ("http", HTTP_GATEWAYS + ["direct", "sockmap"]),
    "in-tunnel-1k": ("http", HTTP_GATEWAYS + ["direct", "sockmap"]),
    "idle": ("http", HTTP_GATEWAYS),
    "idle-keepalive": ("http", HTTP_GATEWAYS),
}

# Cells that hold --idle-tunnels connections idle and measure the memory they hold: CONNECT
# tunnels, and kept-alive connections after one absolute-form request each.
IDLE_SCENARIOS = ("idle", "idle-keepalive")


def variant_workers(name):
    """`proxygate-wN` (a peer name): a second proxygate with N workers, for a same-run A/B of
    the worker count; None for any other name."""
    if name.startswith("proxygate-w") and name[len("proxygate-w"):].isdigit():
        return int(name[len("proxygate-w"):])
    return None


BASELINE = "proxygate-base"


def is_variant(name):
    """A second proxygate beside the first: `proxygate-wN`, or `proxygate-base` (the binary
    given with --baseline: the code before a change, for a same-run before/after)."""
    return name == BASELINE or variant_workers(name) is not None


def speaks(gateway, scenario):
    return ("proxygate" if is_variant(gateway) else gateway) in SCENARIOS[scenario][1]


# What pg-loadgen runs for a scenario of ours, when it is not the scenario of the same name.
LOADGEN = {
    # Open loop: requests inside open tunnels, one due every millisecond; latency counts from
    # when each was due. p50 against "direct" is the latency the gateway adds. (A new tunnel
    # per request at this rate saturates this 2-core box's client, upstreams and origin: the
    # percentiles then measure their queues, not the gateway.)
    "in-tunnel-1k": ["--scenario", "in-tunnel", "--rate", "1000"],
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NAMESPACE_MARK = "PG_PEERS_OWN_NETNS"


def enter_namespace():
    """Runs the rest of this script in a network namespace of its own, its loopback up: with
    `--pool` above 3 the upstreams listen on every address, and there every address is its
    loopback's. Re-executes once under `unshare --net` (root); the build has been done."""
    if os.environ.get(NAMESPACE_MARK) == "1":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        got = fcntl.ioctl(s, siocgifflags, struct.pack("16sH", b"lo", 0))
        flags = struct.unpack("16sH", got)[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))
        s.close()
        return
    unshare = shutil.which("unshare")
    if not unshare or os.geteuid() != 0:
        raise SystemExit("--pool above 3 runs in a network namespace of its own: needs root and "
                         "unshare (util-linux)")
    argv = [unshare, "--net", "--", sys.executable, str(Path(__file__).resolve())]
    argv += [a for a in sys.argv[1:] if a != "--no-build"] + ["--no-build"]
    os.execve(unshare, argv, {**os.environ, NAMESPACE_MARK: "1"})


def wait_port(port, what, limit=20.0):
    end = time.time() + limit
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port}")


def ensure_packages(valgrind=False, perf=False):
    need = []
    for binary, pkg in [("nginx", "nginx-light"), ("squid", "squid"), ("haproxy", "haproxy"),
                        ("tinyproxy", "tinyproxy"), ("microsocks", "microsocks")] + (
                            [("callgrind_control", "valgrind")] if valgrind else []) + (
                            [("perf", "linux-perf")] if perf else []):
        if not (shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists()):
            need.append(pkg)
    if need:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        log("installing", " ".join(need))
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + need,
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       stdout=subprocess.DEVNULL)
    if not shutil.which("pproxy"):
        log("installing pproxy 2.7.9")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "pproxy==2.7.9"], check=True)
    try:
        import uvloop  # noqa: F401
        if not uvloop.__version__.startswith("0.21."):
            raise SystemExit("pproxy 2.7.9 breaks with uvloop " + uvloop.__version__
                             + ": pip install uvloop==0.21.0, or uninstall uvloop")
    except ImportError:
        pass


def sbin(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


class Topology:
    """Every process of the run, stopped on exit."""

    def __init__(self, work: Path, loadgen: Path, proxygate: Path, proxygate_extra: str = "",
                 threads: int = 1, baseline: Path = None, pool: int = 3):
        self.work = work
        # Upstream addresses per pool (`--pool`): three are the three processes themselves.
        self.pool = pool
        # Event-loop threads of proxygate (server.workers) and HAProxy (nbthread) alike; squid
        # and pproxy have one.
        self.threads = threads
        self.loadgen = loadgen
        self.proxygate = proxygate
        # Another proxygate binary, run as the peer `proxygate-base`.
        self.baseline = baseline
        # TOML appended to proxygate's config (tables after the harness's own).
        self.proxygate_extra = proxygate_extra
        self.procs = []
        self.gateways = {}  # (name, pool) -> (port, Popen)
        # (name, pool) -> proxygate's admin port (/metrics).
        self.admin = {}
        # (name, pool) -> the gateway's RSS (bytes) once started, before any load.
        self.rss_at_start = {}
        # Gateways run under callgrind (--instructions), counting only when switched on.
        self.callgrind = False

    def gateway_argv(self, name, argv):
        if not self.callgrind:
            return argv
        # --fair-sched=yes: valgrind runs one thread at a time, and with its default lock a
        # thread spinning on an atomic can keep taking it back. sled's thread pool starts that
        # way (its threads spin on the queue's lazy init while the thread that holds it spawns
        # them), and on some machines proxygate never got to listen.
        return ["valgrind", "--tool=callgrind", "--fair-sched=yes", "--instr-atstart=no",
                f"--callgrind-out-file={self.work}/cg.{name}.%p"] + argv

    def spawn(self, name, argv, **kw):
        logf = open(self.work / f"{name}.log", "w")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                             **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def origin(self, bulk_mib):
        root = self.work / "www"
        root.mkdir()
        (root / "index.html").write_text("hello from the origin\n")
        with open(root / "bulk", "wb") as f:
            f.truncate(bulk_mib * 1024 * 1024)
        self.origin_port = free_port()
        self.status_port = free_port()
        conf = self.work / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log warn;
events {{ worker_connections {FD_LIMIT // 2}; }}
worker_rlimit_nofile {FD_LIMIT};
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    # An idle tunnel's connection carries no request until the cell's end checks it: nginx's
    # default of 60 s for a head to arrive closed the later-checked ones of 10,000 (VM run).
    client_header_timeout 600s;
    sendfile on;
    # With sendfile, nginx writes a response's head and its body as two segments unless
    # corked; tinyproxy relays them as they come without TCP_NODELAY, so the body waits on
    # the client's delayed ACK: 40 ms for one request in ten at 1,000 req/s, whichever
    # gateway is in front. Corked, a small page leaves in one segment.
    tcp_nopush on;
    client_body_temp_path {self.work}/nginx-body;
    proxy_temp_path {self.work}/nginx-proxy;
    fastcgi_temp_path {self.work}/nginx-fastcgi;
    uwsgi_temp_path {self.work}/nginx-uwsgi;
    scgi_temp_path {self.work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{self.origin_port} backlog=65535;
        root {root};
        location / {{ }}
    }}
    server {{
        listen 127.0.0.1:{self.status_port};
        location / {{ stub_status; }}
    }}
}}
""")
        self.origin_proc = self.spawn("nginx", [sbin("nginx"), "-c", str(conf)])
        wait_port(self.origin_port, "nginx")

    def origin_requests(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=5) as r:
            lines = r.read().decode().splitlines()
        # "Active connections: N" / "server accepts handled requests" / " a h r" / ...
        return int(lines[2].split()[2])

    def upstreams(self):
        self.tinyproxies = []
        # Each pool's upstream processes, for the box's CPU per request (`run_cell`).
        self.upstream_procs = {"http": [], "socks": []}
        for i in range(3):
            port = free_port()
            conf = self.work / f"tinyproxy{i}.conf"
            # With a pool of more addresses than processes (in a namespace of its own): every
            # address, and clients from all of 127/8.
            listen = "" if self.pool > 3 else "Listen 127.0.0.1\n"
            allow = "127.0.0.0/8" if self.pool > 3 else "127.0.0.1"
            conf.write_text(f"""Port {port}
{listen}Timeout 600
MaxClients 10000
LogLevel Critical
Allow {allow}
DisableViaHeader Yes
""")
            p = self.spawn(f"tinyproxy{i}", [sbin("tinyproxy"), "-d", "-c", str(conf)])
            self.upstream_procs["http"].append(p)
            self.tinyproxies.append(port)
            if i == 0:
                self.gateways[("direct", "http")] = (port, p)
        self.microsocks = []
        for i in range(3):
            port = free_port()
            bind = "0.0.0.0" if self.pool > 3 else "127.0.0.1"
            p = self.spawn(f"microsocks{i}", [sbin("microsocks"), "-i", bind, "-p", str(port)])
            self.upstream_procs["socks"].append(p)
            self.microsocks.append(port)
            if i == 0:
                self.gateways[("direct", "socks")] = (port, p)
        for p in self.tinyproxies + self.microsocks:
            wait_port(p, "an upstream")

    def addresses(self, ports):
        """A pool's upstream addresses, `HOST:PORT`: one per process, or `--pool` of them over
        127/8 (127.1.0.1 upwards), each on one of the processes' ports in turn."""
        if self.pool <= 3:
            return [f"127.0.0.1:{u}" for u in ports[:self.pool]]
        return [f"127.{1 + k // 62500}.{k // 250 % 250}.{k % 250 + 1}:{ports[k % len(ports)]}"
                for k in range(self.pool)]

    def started(self, name, pool, port, proc):
        self.gateways[(name, pool)] = (port, proc)
        # A pool of many addresses may still be loading after the port opens (proxygate
        # reads its upstreams before it listens; the others, their config): RSS once it is
        # level over half a second.
        last = -1
        for _ in range(120):
            now = rss_bytes(tree(proc.pid))
            if now == last:
                break
            last = now
            time.sleep(0.5)
        self.rss_at_start[(name, pool)] = last

    def start_gateways(self, names):
        for name in names:
            workers = variant_workers(name)
            if workers is not None:
                self.start_proxygate(name, workers)
            elif name == BASELINE:
                if not self.baseline:
                    raise SystemExit(f"{BASELINE} needs --baseline BINARY")
                self.start_proxygate(name, binary=self.baseline)
            elif name != "direct":
                getattr(self, f"start_{name}")()

    def start_proxygate(self, name="proxygate", workers=None, binary=None):
        workers = self.threads if workers is None else workers
        binary = binary or self.proxygate
        for pool, ups, scheme in [("http", self.tinyproxies, "http"),
                                  ("socks", self.microsocks, "socks5")]:
            port = free_port()
            conf = self.work / f"{name}-{pool}.toml"
            conf.write_text("""allow_private_networks = true
sources = []
[server]
connect_ports = "*"
max_connections = 100000
max_connections_per_ip = 100000
workers = {threads}
[pool]
strategy = "round_robin"
[log]
level = "warn"
""".replace("{threads}", str(workers)) + self.proxygate_extra)
            listed = self.work / f"{name}-{pool}-upstreams.txt"
            listed.write_text("".join(f"{scheme}://{a}\n" for a in self.addresses(ups)))
            self.admin[(name, pool)] = admin = free_port()
            argv = [str(binary), "run", "--config", str(conf), "--listen",
                    f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--data-dir",
                    str(self.work / f"{name}-{pool}-data"), "--upstreams-file", str(listed)]
            p = self.spawn(f"{name}-{pool}", self.gateway_argv(f"{name}-{pool}", argv),
                           env={**os.environ, "RUST_LOG": "warn"})
            wait_port(port, name, 120)
            self.started(name, pool, port, p)

    def start_squid(self):
        port = free_port()
        d = self.work / "squid"
        d.mkdir()
        os.chmod(d, 0o777)
        peers = "\n".join(
            f"cache_peer {a.rsplit(':', 1)[0]} parent {a.rsplit(':', 1)[1]} 0 no-query "
            f"no-digest round-robin name=t{i}"
            for i, a in enumerate(self.addresses(self.tinyproxies)))
        conf = d / "squid.conf"
        conf.write_text(f"""http_port 127.0.0.1:{port}
{peers}
never_direct allow all
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_log {d}/cache.log
pid_filename {d}/squid.pid
coredump_dir {d}
max_filedescriptors {FD_LIMIT}
forwarded_for delete
via off
shutdown_lifetime 1 seconds
""")
        p = self.spawn("squid", self.gateway_argv("squid", [sbin("squid"), "-N", "-f", str(conf)]))
        wait_port(port, "squid", 120)
        self.started("squid", "http", port, p)

    def start_haproxy(self):
        hport, sport = free_port(), free_port()
        servers = lambda ups, tag: "\n".join(  # noqa: E731
            f"    server {tag}{i} {a}" for i, a in enumerate(self.addresses(ups)))
        conf = self.work / "haproxy.cfg"
        conf.write_text(f"""global
    maxconn {FD_LIMIT // 2 - 100}
    nbthread {self.threads}
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend http_in
    bind 127.0.0.1:{hport}
    default_backend tinyproxies
frontend socks_in
    bind 127.0.0.1:{sport}
    default_backend microsocks
backend tinyproxies
    balance roundrobin
{servers(self.tinyproxies, "t")}
backend microsocks
    balance roundrobin
{servers(self.microsocks, "m")}
""")
        p = self.spawn("haproxy", self.gateway_argv(
            "haproxy", [sbin("haproxy"), "-db", "-f", str(conf)]))
        wait_port(hport, "haproxy", 120)
        wait_port(sport, "haproxy", 120)
        self.started("haproxy", "http", hport, p)
        self.gateways[("haproxy", "socks")] = (sport, p)

    def start_sockmap(self):
        port = free_port()
        argv = [sys.executable, str(REPO / "tests/bench/sockmap-relay.py"), str(port)]
        p = self.spawn("sockmap", argv + [str(u) for u in self.tinyproxies])
        wait_port(port, "sockmap-relay", 60)
        self.gateways[("sockmap", "http")] = (port, p)

    def start_pproxy(self):
        for pool, ups, scheme in [("http", self.tinyproxies, "http"),
                                  ("socks", self.microsocks, "socks5")]:
            port = free_port()
            argv = [shutil.which("pproxy"), "-l", f"{scheme}://127.0.0.1:{port}", "-s", "rr"]
            for a in self.addresses(ups):
                argv += ["-r", f"{scheme}://{a}"]
            p = self.spawn(f"pproxy-{pool}", self.gateway_argv(f"pproxy-{pool}", argv))
            wait_port(port, "pproxy", 120)
            self.started("pproxy", pool, port, p)


def threads(pids):
    """The thread ids of `pids`."""
    out = []
    for p in pids:
        try:
            out.extend(int(t) for t in os.listdir(f"/proc/{p}/task"))
        except OSError:
            pass
    return out


def tree(pid):
    """pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError):
            pass
    return total


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError):
            pass
    return total


def storage_written(pids):
    """Bytes the processes have sent to storage (write_bytes of /proc/PID/io: page-cache pages
    dirtied, written back whenever): a data dir's writes, logs, a cache. 0 on a tmpfs."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/io") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
        except (OSError, ValueError, StopIteration):
            pass
    return total


def children_cpu_s():
    """CPU seconds of our children that have been waited for (the generator, once reaped)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tcp_out_segments():
    """The kernel's count of TCP segments sent (every process; here all loopback)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def time_wait():
    """TCP sockets in TIME_WAIT on the box (/proc/net/sockstat), every process's."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                v = line.split()
                return int(v[v.index("tw") + 1])
    return 0


def drain_time_wait(most, limit=65.0):
    """Waits (at most `limit` s; TIME_WAIT lasts 60 s) until at most `most` sockets are in
    TIME_WAIT. This kernel charges CPU by the tick: the expiry of a burst of them lands on
    whichever process is running then, perhaps the next cell's gateway (#11, 2026-11-29)."""
    deadline = time.time() + limit
    while time_wait() > most and time.time() < deadline:
        time.sleep(0.5)


def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


def perf_syscalls_work():
    """Whether perf can count syscalls by name here (its syscall tracepoints; root, or a
    permissive perf_event_paranoid, and a kernel with them)."""
    try:
        r = subprocess.run(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_close", "--",
                            "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "sys_enter_close" in r.stderr and "<not" not in r.stderr


# The syscalls counted by name (those a relay makes, and what the peers use instead); the rest
# are counted together. Every syscall tracepoint of the kernel (~350) takes perf seconds to
# switch on and off, for each cell.
SYSCALLS = ["accept4", "accept", "connect", "socket", "close", "shutdown", "setsockopt",
            "getsockopt", "fcntl", "ioctl", "read", "write", "readv", "writev", "recvfrom",
            "sendto", "recvmsg", "sendmsg", "splice", "sendfile64", "epoll_wait", "epoll_pwait",
            "epoll_ctl", "poll", "select", "pselect6", "futex", "clock_gettime", "gettimeofday",
            "io_uring_enter", "madvise", "mmap", "munmap", "brk"]


# What the gateway's threads make the scheduler do, counted beside the syscalls: a relay that
# makes as many syscalls as another can still switch more often, wake its own threads across
# cores, or wake its peers more often. `sched:sched_waking` fires in the waker's context, so it
# counts every wakeup the gateway's threads cause: of its own threads, and of the peers its
# sends reach (on loopback the delivery runs in the sender's syscall).
SCHED_EVENTS = {"context-switches": "switches", "cpu-migrations": "migrations",
                "sched:sched_waking": "wakeups"}


def count_syscalls(pids, out):
    """perf stat counting the syscalls of `pids` (every thread, and any started later), in all
    and by name (SYSCALLS), and their SCHED_EVENTS, into `out`, until stopped with
    `syscalls_counted`. It returns once
    the counting is on: perf starts with its events off and answers the `enable` it is sent
    (attaching to a process's threads took it up to a few hundred ms, whose requests a fixed
    wait missed)."""
    have = Path("/sys/kernel/tracing/events/syscalls")
    named = [f"syscalls:sys_enter_{n}" for n in SYSCALLS
             if not have.is_dir() or (have / f"sys_enter_{n}").is_dir()]
    ctl, ack = Path(f"{out}.ctl"), Path(f"{out}.ack")
    for f in (ctl, ack):
        f.unlink(missing_ok=True)
        os.mkfifo(f)
    # The wakeups counted a second time, of the gateway's own threads alone (those it has now):
    # one worker waking another, or the control plane, on the data path.
    own = " || ".join(f"pid == {t}" for t in threads(pids))
    counter = subprocess.Popen(["perf", "stat", "-x,", "-o", str(out), "-D", "-1",
                                "--control", f"fifo:{ctl},{ack}", "-e",
                                ",".join(["raw_syscalls:sys_enter"] + named + list(SCHED_EVENTS)),
                                "-e", "sched:sched_waking", "--filter", own,
                                "-p", ",".join(str(p) for p in pids)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acks = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
    try:
        until = time.time() + 30
        while True:
            try:
                w = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:  # ENXIO: perf has not opened it yet
                if e.errno != errno.ENXIO or time.time() > until or counter.poll() is not None:
                    raise SystemExit(f"--syscalls: perf did not start counting ({e})")
                time.sleep(0.01)
        os.write(w, b"enable\n")
        os.close(w)
        got = b""
        while b"ack" not in got:
            left = until - time.time()
            if left <= 0 or not select.select([acks], [], [], left)[0]:
                raise SystemExit("--syscalls: perf did not answer `enable` within 30 s")
            try:
                chunk = os.read(acks, 64)
            except BlockingIOError:
                chunk = None
            if not chunk:
                # End of the FIFO: perf closed it. Gone, or about to write again.
                if counter.poll() is not None:
                    raise SystemExit("--syscalls: perf exited before counting")
                time.sleep(0.01)
                continue
            got += chunk
    finally:
        os.close(acks)
    return counter


def syscalls_counted(counter, out):
    """Stops `counter` (count_syscalls) and reads its counts: ({syscall: count}, nonzero ones,
    and {SCHED_EVENTS name: count})."""
    counter.send_signal(signal.SIGINT)
    try:
        counter.wait(timeout=30)
    except subprocess.TimeoutExpired:
        counter.kill()
        counter.wait()
    counts, sched, total = {}, {}, 0
    for line in Path(out).read_text().splitlines():
        f = line.split(",")
        if line.startswith("#") or len(f) < 3 or not f[0].strip().isdigit():
            continue
        if f[2].strip() == "raw_syscalls:sys_enter":
            total += int(f[0])
        elif f[2].strip() in SCHED_EVENTS:
            # sched:sched_waking twice: all, then filtered to the gateway's own threads.
            name = SCHED_EVENTS[f[2].strip()]
            sched["own wakeups" if name in sched else name] = int(f[0])
        elif int(f[0]):
            name = f[2].strip().removeprefix("syscalls:sys_enter_")
            counts[name] = counts.get(name, 0) + int(f[0])
    if total > sum(counts.values()):
        counts["other"] = total - sum(counts.values())
    return counts, sched


def loadgen_argv(topo, port, concurrency):
    """pg-loadgen through the gateway on `port` to the origin's page, JSON out; the caller
    adds the scenario and how long or how many."""
    return [str(topo.loadgen), "--proxy", f"127.0.0.1:{port}", "--origin",
            f"127.0.0.1:{topo.origin_port}", "--json", "--concurrency", str(concurrency),
            "--path", "/index.html"]


def run_cell(topo, gateway, scenario, seconds, args, counted=True):
    pool, _ = SCENARIOS[scenario]
    port, proc = topo.gateways[(gateway, pool)]
    if scenario in IDLE_SCENARIOS and args.idle_tunnels >= 100:
        # A tenth of the tunnels held and closed first, then the settle: the level "before"
        # is a warm process's (thread stacks touched, pools and allocator arenas made), as a
        # gateway that has served before, not a fresh one's. Without it whichever gateway ran
        # its idle cell first read 1.3-1.4x "after", the second 1.0x, the same binary alike.
        warm = loadgen_argv(topo, port, 200) + [
            "--duration", "1s", "--scenario", scenario, "--tunnels", str(args.idle_tunnels // 10)]
        subprocess.run(warm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        time.sleep(args.settle)
    if args.max_time_wait >= 0:
        drain_time_wait(args.max_time_wait)
    tw_at_start = time_wait()
    pids = tree(proc.pid)
    before_cpu = cpu_ticks(pids)
    before_rss = rss_bytes(pids)
    before_written = storage_written(pids)
    before_origin = topo.origin_requests()
    # The rest of the box, for where its CPU goes per request: the upstreams of the cell's
    # pool (process trees; a gateway's own pool when it is "direct"), the origin, and the
    # client (the generator, a child of ours: its time once reaped).
    ups = [q.pid for q in topo.upstream_procs[pool] if q.pid != proc.pid]

    def others():
        return (cpu_ticks([t for u in ups for t in tree(u)]),
                cpu_ticks(tree(topo.origin_proc.pid)), children_cpu_s())
    others0 = others()
    segs0 = tcp_out_segments()
    m0 = machine_ticks()
    concurrency = {"idle": 200, "idle-keepalive": 200, "bulk": 1}.get(scenario, args.concurrency)
    argv = loadgen_argv(topo, port, concurrency) + [
        "--duration", f"{seconds}s"] + LOADGEN.get(scenario, ["--scenario", scenario])
    if scenario in IDLE_SCENARIOS:
        argv += ["--tunnels", str(args.idle_tunnels)]
    counter = None
    if args.syscalls and counted and scenario not in IDLE_SCENARIOS:
        counted_to = topo.work / f"syscalls-{gateway}-{scenario}.csv"
        counter = count_syscalls(tree(proc.pid), counted_to)
    lg = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = before_rss
    held_rss = None
    established_at = None
    os.set_blocking(lg.stderr.fileno(), False)
    err_buf = ""
    while lg.poll() is None:
        time.sleep(0.1)
        peak = max(peak, rss_bytes(tree(proc.pid)))
        try:
            chunk = lg.stderr.read()
        except (OSError, TypeError):
            chunk = None
        if chunk:
            err_buf += chunk
        if scenario in IDLE_SCENARIOS and established_at is None and "established" in err_buf:
            established_at = time.time()
        # Tunnels hold their memory at once. Kept-alive connections go on holding buffers for
        # a while after their answer (proxygate's server.keepalive_release_after, 1 s, then the
        # allocator's return of what they freed): measured a second before the hold ends.
        hold = min(2, seconds / 2) if scenario == "idle" else max(0.5, seconds - 1)
        if established_at and held_rss is None and time.time() - established_at > hold:
            held_rss = rss_bytes(tree(proc.pid))
    out, rest = lg.communicate()
    err_buf += rest or ""
    syscalls, sched = syscalls_counted(counter, counted_to) if counter else (None, None)
    m1 = machine_ticks()
    segs1 = tcp_out_segments()
    after_cpu = cpu_ticks(tree(proc.pid))
    written = storage_written(tree(proc.pid)) - before_written
    others1 = others()
    origin_seen = topo.origin_requests() - before_origin - 1  # less our own status request
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"pg-loadgen failed for {gateway}/{scenario}: {err_buf}{out}")
    done = r["completed"]
    if scenario in IDLE_SCENARIOS:
        done = r.get("tunnels") or 0
    cpu_s = (after_cpu - before_cpu) / CLK_TCK
    busy = 1 - (m1[1] - m0[1]) / max(1, m1[0] - m0[0])
    cell = {
        "gateway": gateway,
        "scenario": scenario,
        "rps": r["rps"],
        "completed": r["completed"],
        "errors": sum(r["errors"].values()),
        "error_kinds": r["errors"],
        "p50_us": (r["latency_us"] or {}).get("p50"),
        "p99_us": (r["latency_us"] or {}).get("p99"),
        "p999_us": (r["latency_us"] or {}).get("p999"),
        # Open loop: how late the generator itself started requests (its pacing error).
        "send_late_p50_us": (r.get("send_late_us") or {}).get("p50"),
        "cpu_us_per_req": cpu_s * 1e6 / done if done else None,
        "peak_rss_mib": peak / 2**20,
        # Bytes the gateway sent to storage during the cell (proxygate: its data dir's stats,
        # written behind every 5 s; squid: its logs).
        "written_bytes": written,
        "busy": busy,
        "origin_seen": origin_seen,
        # Sockets in TIME_WAIT when the cell started (see drain_time_wait).
        "time_wait_at_start": tw_at_start,
        "mbytes_per_s": r.get("mbytes_per_s"),
        # Bulk: the gateway's CPU per GiB it relayed.
        "cpu_ms_per_gib": cpu_s * 1e3 / (r["bytes"] / 2**30) if r.get("bytes") else None,
    }
    if done and scenario not in IDLE_SCENARIOS:
        # Where the box's CPU went per request: at a saturated box the rate is about the
        # cores over their sum, so a gateway's rate ratio to another is bounded by the rest.
        per = lambda ticks: ticks / CLK_TCK * 1e6 / done  # noqa: E731
        cell["box_us_per_req"] = {
            "gateway": cell["cpu_us_per_req"],
            "upstreams": per(others1[0] - others0[0]),
            "origin": per(others1[1] - others0[1]),
            "client": (others1[2] - others0[2]) * 1e6 / done,
            "box": per((m1[0] - m1[1]) - (m0[0] - m0[1])),
        }
        # The box's CPU per request, every process and the kernel's own work: the measure a
        # relay that moves its work out of its own process (into kworkers, say) answers to.
        cell["box_us"] = cell["box_us_per_req"]["box"]
        # TCP segments per request over every hop (client, gateway, upstream, origin): a
        # gateway that splits a message or sends ACKs of its own where data could carry them
        # makes every hop's kernel work more.
        cell["segments_per_req"] = (segs1 - segs0) / done
        if syscalls is not None:
            # The gateway's syscalls per request, by name (--syscalls): a count that repeats
            # where CPU time moves with the box, as instructions do under callgrind.
            cell["syscalls_per_req"] = {k: v / done for k, v in sorted(syscalls.items())}
            cell["sched_per_req"] = {k: v / done for k, v in sorted(sched.items())}
    if scenario in IDLE_SCENARIOS:
        # Hand the tunnels back, then see how much of the memory the gateway returns.
        cell["idle_tunnels"] = r.get("tunnels")
        # Per connection held: established, and still answering at the end. A gateway that
        # closed some (HAProxy in TCP mode passes tinyproxy's close after an absolute-form
        # answer, whatever the client asked) is measured over the rest.
        m = re.search(r"established (\d+)", err_buf)
        held = min(int(m.group(1)) if m else args.idle_tunnels, r.get("tunnels") or 0)
        cell["held"] = held
        if held_rss is not None and held:
            cell["rss_per_idle_tunnel_kib"] = (held_rss - before_rss) / held / 1024
        time.sleep(args.settle)
        after = rss_bytes(tree(proc.pid))
        cell["rss_after_ratio"] = after / before_rss if before_rss else None
    return cell


# Scenarios of one request's work each (bulk and idle are not): counted by --instructions, and
# split across the box per request.
ONE_REQUEST_SCENARIOS = ["connect", "socks5", "in-tunnel", "keepalive", "absolute-new"]


def callgrind_cell(topo, gateway, scenario, requests, args):
    """User-space instructions per request of `gateway` for `scenario` (callgrind)."""
    pool, _ = SCENARIOS[scenario]
    port, proc = topo.gateways[(gateway, pool)]

    def loadgen(n):
        argv = loadgen_argv(topo, port, args.concurrency) + [
            "--requests", str(n), "--duration", "600s", "--scenario", scenario]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    def control(*what):
        try:
            subprocess.run(["callgrind_control", *what, str(proc.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise SystemExit(f"callgrind_control {' '.join(what)} failed for {gateway}: {e}")

    # Inside open tunnels a request is cheap and each run opens its tunnels anew: ten times
    # as many requests, so that opening them is a small part of the count.
    if scenario == "in-tunnel":
        requests *= 10
    loadgen(max(100, requests // 10))  # warm-up, not counted
    control("--zero")
    control("--instr=on")
    r = loadgen(requests)
    control("--instr=off")
    control("--dump")
    # The pid alone names the process's dumps (cg.<name>.<pid>.<n>).
    dumps = sorted(topo.work.glob(f"cg.*.{proc.pid}.*"),
                   key=lambda f: int(f.name.rsplit(".", 1)[1]))
    if not dumps:
        raise SystemExit(f"callgrind wrote no dump for {gateway}")
    # `totals:` (at the end): what was counted since the zeroing (`summary:` may say 0).
    total = 0
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            total = int(line.split()[1])
    done = r["completed"]
    return {"gateway": gateway, "scenario": scenario, "completed": done,
            "errors": sum(r["errors"].values()),
            "instructions_per_req": total / done if done else None}


def instructions_table(cells, gateways):
    scen = [s for s in ONE_REQUEST_SCENARIOS if any(c["scenario"] == s for c in cells)]
    lines = ["| scenario | " + " | ".join(gateways) + " |",
             "|---" * (len(gateways) + 1) + "|"]
    for sc in scen:
        row = []
        for g in gateways:
            c = next((c for c in cells if c["scenario"] == sc and c["gateway"] == g), None)
            v = c and c["instructions_per_req"]
            row.append(f"{v / 1000:.1f}k" if v else "–")
        lines.append(f"| {sc} | " + " | ".join(row) + " |")
    out = ["\n".join(lines), ""]
    for sc in scen:
        ours = next((c["instructions_per_req"] for c in cells
                     if c["scenario"] == sc and c["gateway"] == "proxygate"), None)
        for g in gateways:
            if g == "proxygate":
                continue
            theirs = next((c["instructions_per_req"] for c in cells
                           if c["scenario"] == sc and c["gateway"] == g), None)
            if ours and theirs:
                out.append(f"- {sc}: proxygate / {g} = {ours / theirs:.2f}")
    return "\n".join(out)


def soak(topo, requests, scenario="keepalive"):
    """`requests` requests through proxygate in one run (closed loop, 50 connections), RSS
    sampled every second: memory must stay flat and no request may fail."""
    port, proc = topo.gateways[("proxygate", SCENARIOS[scenario][0])]
    before_origin = topo.origin_requests()
    argv = loadgen_argv(topo, port, 50) + [
        "--duration", "1800s", "--requests", str(requests), "--scenario", scenario]
    t0 = time.time()
    lg = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples = []
    while lg.poll() is None:
        time.sleep(1)
        samples.append((time.time() - t0, rss_bytes(tree(proc.pid))))
    out, _ = lg.communicate()
    r = json.loads(out.strip().splitlines()[-1])
    origin_seen = topo.origin_requests() - before_origin - 1
    # Memory once the run is warm (after a tenth of it) against its end and its peak.
    warm = [m for t, m in samples if t >= samples[-1][0] / 10] or [m for _, m in samples]
    return {
        "scenario": scenario, "requests": requests, "completed": r["completed"],
        "errors": r["errors"], "rps": r["rps"], "seconds": round(time.time() - t0, 1),
        "origin_seen": origin_seen,
        "rss_warm_mib": warm[0] / 2**20, "rss_end_mib": warm[-1] / 2**20,
        "rss_peak_mib": max(warm) / 2**20,
        "p50_us": (r["latency_us"] or {}).get("p50"), "p99_us": (r["latency_us"] or {}).get("p99"),
        # Every sample, (seconds, MiB), for --json-out: flat or still climbing at the end.
        "rss_samples_mib": [(round(t, 1), round(m / 2**20, 2)) for t, m in samples],
    }


def metric(topo, name, pool, series):
    """One series' value from a proxygate's /metrics (0 when absent)."""
    url = f"http://127.0.0.1:{topo.admin[(name, pool)]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# One round of the parking soak: this many keep-alive requests on this many client
# connections, then an idle pause past proxygate's server.keepalive_release_after (1 s), the
# worker's one-second tick that parks them (at any phase), and the next, which publishes.
PARK_ROUND = (2000, 100)
PARK_PAUSE = 2.5


def park_soak(topo, rounds):
    """Kept upstream connections parked and taken up again, `rounds` times: rounds of
    keep-alive requests through proxygate's HTTP pool (tinyproxy closes after every
    absolute-form request, so proxygate keeps a CONNECT tunnel per (upstream, origin)), each
    followed by an idle pause in which the kept connections park. No request may fail or reach
    the origin twice or not at all, the parked connections must be taken up again (requests on
    kept connections, from proxygate's /metrics), and memory must stay flat."""
    port, proc = topo.gateways[("proxygate", "http")]
    requests, concurrency = PARK_ROUND
    # What earlier cells did is in the metrics within a tick.
    time.sleep(PARK_PAUSE)
    before_origin = topo.origin_requests()
    reused0 = metric(topo, "proxygate", "http", "proxygate_upstream_reused_total")
    completed, errors, parked, rss = 0, {}, [], []
    t0 = time.time()
    for _ in range(rounds):
        argv = loadgen_argv(topo, port, concurrency) + [
            "--duration", "60s", "--requests", str(requests), "--scenario", "keepalive"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
        r = json.loads(out.strip().splitlines()[-1])
        completed += r["completed"]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        time.sleep(PARK_PAUSE)
        parked.append(metric(topo, "proxygate", "http",
                             'proxygate_upstream_kept_connections{state="parked"}'))
        rss.append(rss_bytes(tree(proc.pid)))
    reused = metric(topo, "proxygate", "http", "proxygate_upstream_reused_total") - reused0
    # Memory once warm (after a tenth of the rounds) against the end and the peak.
    warm = rss[len(rss) // 10:] or rss
    return {
        "rounds": rounds, "requests": rounds * requests, "completed": completed,
        "errors": errors, "seconds": round(time.time() - t0, 1),
        "origin_seen": topo.origin_requests() - before_origin - 1, "reused": reused,
        "parked_min": min(parked), "parked_max": max(parked),
        "rss_warm_mib": warm[0] / 2**20, "rss_end_mib": warm[-1] / 2**20,
        "rss_peak_mib": max(warm) / 2**20,
        "rss_by_round_mib": [round(m / 2**20, 2) for m in rss],
    }


def fmt_cell(c):
    if c is None:
        return "–"
    if c["scenario"] in IDLE_SCENARIOS:
        kib = c.get("rss_per_idle_tunnel_kib")
        ratio = c.get("rss_after_ratio")
        what = "tunnel" if c["scenario"] == "idle" else "conn"
        held = c.get("held")
        return (f"{kib:.1f} KiB/{what}, after {ratio:.1f}x" if kib is not None and ratio
                else "n/a") + (f" [{c['errors']} err]" if c["errors"] else "") + (
                    f" [{held} held]" if held is not None and held < c["completed"] else "")
    if c["scenario"] == "bulk":
        s = f"{c['mbytes_per_s']:.0f} MB/s"
        if c["gateway"] != "direct" and c.get("cpu_ms_per_gib"):
            s += f" ({c['cpu_ms_per_gib']:.0f} ms/GiB)"
    elif c["scenario"] == "in-tunnel-1k":
        s = f"p50 {c['p50_us'] / 1000:.3f} ms, p99 {c['p99_us'] / 1000:.2f} ms"
        if c["gateway"] != "direct" and c["cpu_us_per_req"]:
            s += f" ({c['cpu_us_per_req']:.0f} µs)"
    else:
        cpu = c["cpu_us_per_req"]
        s = f"{c['rps']:.0f}/s ({cpu:.0f} µs) p99 {c['p99_us'] / 1000:.1f} ms" if cpu else \
            f"{c['rps']:.0f}/s"
    if c["errors"]:
        s += f" [{c['errors']} err]"
    return s


def table(cells, gateways):
    by = {}
    for c in cells:
        by.setdefault((c["scenario"], c["gateway"]), []).append(c)
    lines = ["| scenario | " + " | ".join(gateways) + " |",
             "|---|" + "---|" * len(gateways)]
    for sc in SCENARIOS:
        row = []
        for g in gateways:
            runs = by.get((sc, g), [])
            row.append(" / ".join(fmt_cell(c) for c in runs) if runs else "–")
        lines.append(f"| {sc} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def box_table(cells, gateways):
    """Where the box's CPU went per request in the cells of one request's work (means over
    passes): the gateway, the upstreams, the origin, the client, and the rest of the box, and
    the TCP segments every hop sent per request. On a saturated box the rate is about its cores
    over the total, so one gateway's rate over another's is bounded by what the others cost:
    what a cheaper gateway can gain in rate."""
    lines = ["| scenario | gateway | gateway µs | upstreams µs | origin µs | client µs | "
             "rest of the box µs | box µs | box busy | TCP segments |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for sc in ONE_REQUEST_SCENARIOS:
        for g in gateways:
            runs = [c for c in cells if c["scenario"] == sc and c["gateway"] == g
                    and c.get("box_us_per_req")]
            if not runs:
                continue
            m = {k: sum(c["box_us_per_req"][k] or 0 for c in runs) / len(runs)
                 for k in ("gateway", "upstreams", "origin", "client", "box")}
            if g == "direct":
                # No gateway: the process measured as one is the upstream the client goes to.
                m["upstreams"] += m["gateway"]
                m["gateway"] = 0
            rest = m["box"] - m["gateway"] - m["upstreams"] - m["origin"] - m["client"]
            busy = sum(c["busy"] for c in runs) / len(runs)
            segs = sum(c.get("segments_per_req") or 0 for c in runs) / len(runs)
            lines.append(f"| {sc} | {g} | {m['gateway']:.0f} | {m['upstreams']:.0f} | "
                         f"{m['origin']:.0f} | {m['client']:.0f} | {rest:.0f} | {m['box']:.0f} | "
                         f"{busy:.0%} | {segs:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def syscalls_table(cells, gateways):
    """The gateway's syscalls per request (means over passes, --syscalls), in all and by name:
    those made at least once in twenty requests, most first; and its context switches, CPU
    migrations and the wakeups it caused (SCHED_EVENTS)."""
    lines = ["| scenario | gateway | syscalls | switches | migrations | wakeups (of its own "
             "threads) | by name |", "|---|---|---|---|---|---|---|"]
    for sc in ONE_REQUEST_SCENARIOS:
        for g in gateways:
            runs = [c for c in cells if c["scenario"] == sc and c["gateway"] == g
                    and c.get("syscalls_per_req") is not None]
            if not runs:
                continue
            names = {k for c in runs for k in c["syscalls_per_req"]}
            m = {k: sum(c["syscalls_per_req"].get(k, 0) for c in runs) / len(runs) for k in names}
            by = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m.items(), key=lambda kv: -kv[1])
                           if v >= 0.05)
            def m_of(e):
                v = [c.get("sched_per_req", {}).get(e) for c in runs]
                return f"{sum(v) / len(v):.2f}" if None not in v else "–"
            ev = (f"{m_of('switches')} | {m_of('migrations')} | {m_of('wakeups')} "
                  f"({m_of('own wakeups')})")
            lines.append(f"| {sc} | {g} | {sum(m.values()):.2f} | {ev} | {by} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ratios(cells):
    """Key ratios of proxygate (and of each `proxygate-wN` and `proxygate-base`) against each
    peer (means over passes)."""
    def mean(sc, g, key):
        v = [c[key] for c in cells if c["scenario"] == sc and c["gateway"] == g and c.get(key)]
        return sum(v) / len(v) if v else None

    def per_pass(sc, a, b, key):
        """`a`'s figure over `b`'s, pass by pass: on a busy box a cell's place in its pass
        moves it by up to 20 %, and passes alternate the order, so the spread says how far
        one pass's ratio can be trusted."""
        by = {}
        for c in cells:
            if c["scenario"] == sc and c["gateway"] in (a, b) and c.get(key):
                by.setdefault(c.get("pass"), {})[c["gateway"]] = c[key]
        return [v[a] / v[b] for _, v in sorted(by.items(), key=lambda kv: kv[0] or 0)
                if a in v and b in v]
    out = []
    for sc, key, what, fmt in [("in-tunnel-1k", "p50_us", "p50 at 1,000 req/s, added to direct",
                                lambda a, b: f"{(a - b) / 1000:+.2f} ms"),
                               ("bulk", "mbytes_per_s", "bulk throughput, share of direct",
                                lambda a, b: f"{a / b:.0%}")]:
        ours, direct = mean(sc, "proxygate", key), mean(sc, "direct", key)
        if ours and direct:
            out.append(f"- {what}: {fmt(ours, direct)}")
    for sc, key, what in [("connect", "cpu_us_per_req", "CPU per tunnel"),
                          ("connect", "rps", "tunnels/s"),
                          ("socks5", "cpu_us_per_req", "CPU per SOCKS5 tunnel"),
                          ("in-tunnel", "cpu_us_per_req", "CPU per in-tunnel request"),
                          ("connect", "box_us", "box CPU per tunnel"),
                          ("in-tunnel", "box_us", "box CPU per in-tunnel request"),
                          ("bulk", "cpu_ms_per_gib", "CPU per GiB relayed"),
                          ("keepalive", "rps", "keep-alive req/s"),
                          ("idle", "rss_per_idle_tunnel_kib", "RSS per idle tunnel"),
                          ("idle-keepalive", "rss_per_idle_tunnel_kib",
                           "RSS per idle keep-alive connection")]:
        variants = sorted({c["gateway"] for c in cells if is_variant(c["gateway"])})
        for us in ["proxygate"] + variants:
            ours = mean(sc, us, key)
            # The sockmap relay's own CPU is next to none by design (its work is the kernel's,
            # outside it): it is compared by the box's CPU only.
            peers = ["squid", "haproxy", "pproxy"] + (["sockmap"] if key == "box_us" else []) + (
                ["proxygate"] if us != "proxygate" else [])
            for g in peers:
                theirs = mean(sc, g, key)
                if ours and theirs:
                    line = f"- {what}: {us} / {g} = {ours / theirs:.2f}"
                    r = per_pass(sc, us, g, key) if key in ("cpu_us_per_req", "box_us") else []
                    if len(r) >= 3:
                        geo = math.exp(sum(math.log(x) for x in r) / len(r))
                        line += (f" (per pass {', '.join(f'{x:.2f}' for x in r)}; "
                                 f"geometric mean {geo:.2f})")
                    out.append(line)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--idle-tunnels", type=int, default=5000)
    ap.add_argument("--settle", type=float, default=10, help="seconds after idle tunnels close")
    ap.add_argument("--bulk-mib", type=int, default=256)
    ap.add_argument("--max-time-wait", type=int, default=-1, metavar="N",
                    help="before each cell wait (at most 65 s) until at most N sockets are in "
                         "TIME_WAIT; -1 (default) does not wait. Each cell records the count")
    ap.add_argument("--peers", default="proxygate,squid,haproxy,pproxy,direct")
    ap.add_argument("--park-soak", type=int, default=0, metavar="ROUNDS",
                    help=f"then ROUNDS rounds of {PARK_ROUND[0]:,} keep-alive requests through "
                    f"proxygate, each followed by {PARK_PAUSE} s idle, so that its kept upstream "
                    "connections park and are taken up again: every request must reach the "
                    "origin once, parked connections must be taken up (its reuse metrics), "
                    "memory sampled each round")
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="then N keep-alive requests through proxygate, memory sampled")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--smoke", action="store_true",
                    help="1 s per cell, one pass, 200 idle tunnels: checks the harness works")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="event-loop threads of proxygate (server.workers) and HAProxy "
                    "(nbthread) alike; squid and pproxy have one")
    ap.add_argument("--proxygate-config", default="", metavar="TOML",
                    help="appended to proxygate's config, e.g. '[dial]\\nhedge_ratio = 0.0'")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another proxygate binary (say, a build of the previous commit), run "
                    f"as the peer {BASELINE}")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="count user-space instructions per request under callgrind instead, "
                    "N requests per scenario and gateway")
    ap.add_argument("--pool", type=int, default=3, metavar="N",
                    help="upstream addresses per pool, spread over the three upstream processes "
                    "of its kind (default 3: one each); more than 3 runs in a network namespace "
                    "of its own (root)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count each gateway's syscalls per request by name with perf (its "
                    "syscall tracepoints: root), and its context switches, CPU migrations and "
                    "the wakeups it causes. Counting costs each syscall a little: read "
                    "the CPU figures of such a run with that in mind")
    ap.add_argument("--json-out")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (configs, logs, callgrind dumps for "
                    "callgrind_annotate) and print its path")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.passes, args.idle_tunnels, args.settle, args.bulk_mib = 1, 1, 200, 1, 16
    gateways = [g for g in args.peers.split(",") if g]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s}")
    ensure_packages(valgrind=bool(args.instructions), perf=args.syscalls)
    if args.syscalls and not perf_syscalls_work():
        raise SystemExit("--syscalls: perf cannot count syscalls here (its syscall tracepoints "
                         "need root or kernel.perf_event_paranoid <= -1, and a kernel with "
                         "them)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--locked", "--release", "-p", "proxygate",
                        "-p", "proxygate-loadgen"], cwd=REPO, check=True)
    if args.pool < 1:
        raise SystemExit("--pool needs at least one address")
    if args.pool > 3:
        enter_namespace()
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    work = Path(tempfile.mkdtemp(prefix="pg-peers-"))
    os.chmod(work, 0o755)
    if args.keep_work:
        log(f"work directory (kept): {work}")
    topo = Topology(work, target / "pg-loadgen", target / "proxygate",
                    args.proxygate_config.replace("\\n", "\n"), args.threads,
                    Path(args.baseline) if args.baseline else None, args.pool)
    cells = []
    if args.instructions:
        if "squid" in gateways:
            # It switches to its own user, whom callgrind_control (vgdb) cannot reach.
            log("--instructions: squid left out (it changes user; callgrind_control cannot "
                "reach it)")
        gateways = [g for g in gateways if g not in ("direct", "squid")]
        topo.callgrind = True
        try:
            topo.origin(args.bulk_mib)
            topo.upstreams()
            topo.start_gateways(gateways)
            for sc in [s for s in scenarios if s in ONE_REQUEST_SCENARIOS]:
                for g in gateways:
                    if speaks(g, sc):
                        log(f"{sc} via {g}: {args.instructions} requests under callgrind")
                        c = callgrind_cell(topo, g, sc, args.instructions, args)
                        log(f"    {c['instructions_per_req'] or 0:,.0f} instructions per request,"
                            f" {c['errors']} errors")
                        cells.append(c)
        finally:
            topo.stop()
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"## User-space instructions per request (callgrind), {stamp}\n")
        print(f"{args.instructions} requests per cell ({args.instructions * 10} inside open "
              f"tunnels, whose opening is counted too) after a warm-up, {args.concurrency} "
              "connections, one thread each; the kernel's share is not counted. HAProxy "
              "passes absolute-form requests through as bytes (TCP mode): the keepalive "
              "and absolute-new cells compare HTTP handling against none.\n")
        print(instructions_table(cells, gateways))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"when": stamp, "cells": cells}, indent=1))
        if any(c["errors"] for c in cells if c["gateway"] == "proxygate"):
            sys.exit(1)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        topo.origin(args.bulk_mib)
        topo.upstreams()
        topo.start_gateways(gateways)
        order = [(s, g) for s in scenarios for g in gateways
                 if speaks(g, s) and s not in IDLE_SCENARIOS]
        # Idle tunnels first, once, while every gateway is fresh: memory a process has freed
        # is reused by the next round, so later rounds measure the allocator, not the tunnel.
        first = [(s, g) for s in IDLE_SCENARIOS for g in gateways if s in scenarios]
        for p in range(args.passes):
            cells_of_pass = order if p % 2 == 0 else list(reversed(order))
            if p == 0:
                cells_of_pass = first + [("warm-up", None)] + cells_of_pass
            for sc, g in cells_of_pass:
                if sc == "warm-up":
                    # A second of connect and of socks5 through every gateway, not counted:
                    # the run's first measured cell, right after the idle ones, read 10-20 %
                    # more CPU per tunnel than the same gateway's in the second pass (87 and
                    # 92 us against 76 and 80 in two full runs), whichever gateway it was.
                    for wsc, wg in [(s2, g2) for s2, g2 in order
                                    if s2 in ("connect", "socks5")]:
                        log(f"warm-up: {wsc} via {wg}, not counted")
                        run_cell(topo, wg, wsc, 1, args, counted=False)
                    continue
                log(f"pass {p + 1}: {sc} via {g}")
                c = run_cell(topo, g, sc, args.seconds, args)
                c["pass"] = p + 1
                cells.append(c)
                log("   ", fmt_cell(c), f"(origin saw {c['origin_seen']}, busy {c['busy']:.0%}, "
                    f"{c['time_wait_at_start']} in TIME_WAIT at its start)")
        parking = None
        if args.park_soak:
            log(f"parking soak: {args.park_soak} rounds through proxygate")
            parking = park_soak(topo, args.park_soak)
            log("   ", {k: v for k, v in parking.items() if k != "rss_by_round_mib"})
        soaked = None
        if args.soak:
            log(f"soak: {args.soak} keep-alive requests through proxygate")
            soaked = soak(topo, args.soak)
            log("   ", soaked)
    finally:
        topo.stop()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    versions = {
        "squid": subprocess.run([sbin("squid"), "-v"], capture_output=True, text=True).stdout
        .splitlines()[0],
        "haproxy": subprocess.run([sbin("haproxy"), "-v"], capture_output=True, text=True).stdout
        .splitlines()[0],
        "pproxy": subprocess.run([shutil.which("pproxy") or "pproxy", "--version"],
                                 capture_output=True, text=True).stdout.strip(),
    }
    print(f"## proxygate and its peers, {stamp}\n")
    print(f"{os.cpu_count()} CPUs; {args.seconds:g} s per cell, {args.passes} pass(es), "
          f"{args.concurrency} connections, {args.threads} thread(s) each for proxygate and "
          f"HAProxy; {', '.join(versions.values())}. Each cell: "
          "rate (gateway CPU µs per completed request) and the client's p99; one entry per pass. "
          "`direct`: no gateway, the client goes to the first upstream itself (its CPU is the "
          "upstream's). `bulk`: MB/s (gateway CPU ms per GiB relayed). `in-tunnel-1k`: open "
          "loop, 1,000 req/s inside open tunnels, latency from when each was due.\n")
    print(table(cells, gateways))
    box = box_table(cells, gateways)
    if box:
        print("\nWhere the box's CPU went per request (means over passes; `rest of the box` is "
              "every other process and the kernel's own work outside them):\n")
        print(box)
    counted = syscalls_table(cells, gateways)
    if counted:
        print("\nThe gateway's syscalls per request (perf's syscall tracepoints; means over "
              "passes), with its context switches, CPU migrations, and the wakeups it caused "
              "(its own threads' and its peers'; of its own threads alone in brackets):\n")
        print(counted)
    print()
    print(ratios(cells))
    print(f"\nRSS once started, before any load, {args.pool:,} upstream addresses per pool: "
          + "; ".join(f"{g} {pool} {b / 2**20:.1f} MiB"
                      for (g, pool), b in sorted(topo.rss_at_start.items())) + ".")
    written = {}
    for c in cells:
        w = written.setdefault(c["gateway"], [0, 0])
        w[0] += c.get("written_bytes") or 0
        w[1] += c["completed"] if c["scenario"] not in IDLE_SCENARIOS else 0
    print("\nSent to storage during the cells (write_bytes; a data dir, logs; 0 on a tmpfs): "
          + "; ".join(f"{g} {b / 2**20:.1f} MiB ({b / n:.0f} B per request)" if n else
                      f"{g} {b / 2**20:.1f} MiB" for g, (b, n) in written.items()) + ".")
    if parking:
        n, c = PARK_ROUND
        print(f"\nParking soak: {parking['rounds']} rounds of {n:,} keep-alive requests on {c} "
              f"client connections, each followed by {PARK_PAUSE} s idle, so that proxygate's "
              f"kept upstream connections park and are taken up again: "
              f"{parking['completed']:,} of {parking['requests']:,} completed in "
              f"{parking['seconds']} s, errors {sum(parking['errors'].values())}, the origin saw "
              f"{parking['origin_seen']:,}; {parking['reused']:,.0f} went on kept connections; "
              f"{parking['parked_min']:.0f}-{parking['parked_max']:.0f} parked after each pause; "
              f"RSS {parking['rss_warm_mib']:.1f} MiB once warm, {parking['rss_peak_mib']:.1f} "
              f"MiB at most, {parking['rss_end_mib']:.1f} MiB at the end.")
    if soaked:
        print(f"\nSoak: {soaked['completed']:,} of {soaked['requests']:,} keep-alive requests "
              f"through proxygate in {soaked['seconds']} s ({soaked['rps']:.0f}/s), errors "
              f"{sum(soaked['errors'].values())}, the origin saw {soaked['origin_seen']:,}; "
              f"RSS {soaked['rss_warm_mib']:.1f} MiB once warm, {soaked['rss_peak_mib']:.1f} "
              f"MiB at most, {soaked['rss_end_mib']:.1f} MiB at the end.")
    if args.json_out:
        rss_at_start = {f"{g}/{pool}": round(b / 2**20, 2)
                        for (g, pool), b in topo.rss_at_start.items()}
        Path(args.json_out).write_text(json.dumps({
            "when": stamp, "versions": versions, "pool": args.pool,
            "rss_at_start_mib": rss_at_start, "cells": cells, "soak": soaked,
            "park_soak": parking}, indent=1))
    bad = [c for c in cells if c["gateway"] == "proxygate" and (
        c["errors"] or (c["completed"] == 0 and c["scenario"] not in IDLE_SCENARIOS)
        or (args.syscalls and c["scenario"] in ONE_REQUEST_SCENARIOS
            and not c.get("syscalls_per_req")))]
    if soaked and (sum(soaked["errors"].values()) or soaked["completed"] != soaked["requests"]):
        bad.append(soaked)
    if parking and (sum(parking["errors"].values()) or parking["completed"] != parking["requests"]
                    or parking["origin_seen"] != parking["requests"] or not parking["parked_min"]
                    or not parking["requests"] / 2 <= parking["reused"] <= parking["requests"]):
        bad.append(parking)
    if bad:
        log("proxygate cells with errors:", json.dumps(bad, indent=1))
        sys.exit(1)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
