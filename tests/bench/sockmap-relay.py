#!/usr/bin/env python3
"""A CONNECT relay whose established tunnels are joined inside the kernel: a reference point
for what proxygate's user-space relay could save, not a gateway.

Each tunnel's two sockets go into a BPF sockhash, keyed by each socket's cookie with the other
socket as the value; an SK_SKB verdict program (thirteen instructions, assembled below, no
compiler needed) redirects every segment that arrives on one socket to the other's egress, so
no byte of an established tunnel passes through this process. The handshake (the client's
CONNECT passed to an upstream HTTP proxy round robin, its reply passed back) is plain Python,
one thread per connection: only the scenarios inside open tunnels (`in-tunnel`,
`in-tunnel-1k`, `bulk`) say anything about it.

What it leaves out, and why it is no more than a measurement: the bytes the kernel redirects
are sent by a kworker, after the fact, so a FIN read on one side may overtake bytes still
queued for the other (this relay shuts the other side down at once); nothing counts the bytes
or watches for idleness; it needs CAP_BPF and CAP_NET_ADMIN. `peers.py --peers sockmap,...`
runs it (Linux 5.13 or later, as root).

usage: sockmap-relay.py LISTEN_PORT UPSTREAM_PORT...
"""
import ctypes
import itertools
import os
import select
import socket
import struct
import sys
import threading

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
ATTACH = int(os.environ.get("ATTACH", "38"))  # BPF_SK_SKB_VERDICT (5: STREAM_VERDICT)
SO_COOKIE = 57


def bpf(cmd, attr: bytes):
    buf = ctypes.create_string_buffer(attr, 144)
    r = libc.syscall(SYS_BPF, cmd, buf, 144)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def main():
    port = int(sys.argv[1])
    ups = [int(p) for p in sys.argv[2:]]
    map_fd = bpf(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_SOCKHASH, 8, 4, 65536, 0))
    prog = b"".join([
        insn(0xbf, 6, 1),                 # r6 = r1 (skb)
        insn(0x85, imm=46),               # r0 = bpf_get_socket_cookie(skb)
        insn(0x7b, 10, 0, -8),            # *(u64 *)(r10 - 8) = r0
        insn(0xbf, 1, 6),                 # r1 = skb
        insn(0x18, 2, 1, imm=map_fd),     # r2 = map (ld_imm64, pseudo map fd)
        insn(0x00),
        insn(0xbf, 3, 10),                # r3 = r10
        insn(0x07, 3, imm=-8),            # r3 -= 8
        insn(0xb7, 4, imm=0),             # r4 = 0 (egress)
        insn(0x85, imm=72),               # r0 = bpf_sk_redirect_hash(skb, map, &key, 0)
        insn(0x55, 0, off=1, imm=0),      # if r0 != SK_DROP goto exit
        insn(0xb7, 0, imm=1),             # r0 = SK_PASS (no peer: keep it for user space)
        insn(0x95),                       # exit
    ])
    insns = ctypes.create_string_buffer(prog)
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("<IIQQIIQII16sII", BPF_PROG_TYPE_SK_SKB, len(prog) // 8,
                       ctypes.addressof(insns), ctypes.addressof(lic), 1, len(log),
                       ctypes.addressof(log), 0, 0, b"pg_splice", 0, ATTACH)
    try:
        prog_fd = bpf(BPF_PROG_LOAD, attr)
    except OSError:
        print(log.value.decode(), file=sys.stderr)
        raise
    bpf(BPF_PROG_ATTACH, struct.pack("<IIII", map_fd, prog_fd, ATTACH, 0))

    def update(key_sock, val_sock):
        key = ctypes.create_string_buffer(key_sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), 8)
        val = ctypes.create_string_buffer(struct.pack("<I", val_sock.fileno()), 4)
        bpf(BPF_MAP_UPDATE_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key),
                                             ctypes.addressof(val), 0))

    rr = itertools.cycle(ups)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1024)

    def head(s):
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                raise ConnectionError("closed in head")
            buf += d
        return buf

    def serve(c, up_port):
        u = socket.socket()
        try:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            req = head(c)
            u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            u.connect(("127.0.0.1", up_port))
            u.sendall(req)
            rep = head(u)
            update(c, u)
            update(u, c)
            c.sendall(rep)
            p = select.poll()
            p.register(c, select.POLLRDHUP)
            p.register(u, select.POLLRDHUP)
            done = set()
            while len(done) < 2:
                for fd, ev in p.poll():
                    if fd in done:
                        continue
                    done.add(fd)
                    p.unregister(fd)
                    other = u if fd == c.fileno() else c
                    try:
                        other.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
        except OSError:
            pass
        finally:
            c.close()
            u.close()

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c, next(rr)), daemon=True).start()


if __name__ == "__main__":
    main()
