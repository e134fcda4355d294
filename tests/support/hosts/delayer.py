"""Latency and loss for kernels without ``tc netem``: the switch hands every packet it forwards to
this process (NFQUEUE), which lets it through after the delay, or drops it.

Run inside the switch's namespace as ``python -m tests.support.hosts.delayer --delay-ms 20
--jitter-ms 5 --loss-pct 0``; ``Network.set_latency`` starts it and adds the rule that queues the
bridge's IPv4 traffic to it (``iptables -A FORWARD -j NFQUEUE``: the bridge passes frames through
iptables, br_netfilter). Each packet between two hosts is forwarded once, so it is delayed once,
as with netem on each host's egress. It prints ``bound`` once it takes packets.

The netfilter queue protocol is spoken directly over a netlink socket (a few fixed structs,
linux/netfilter/nfnetlink_queue.h), so nothing beyond the standard library is needed. Only the
packet ids are copied to userspace (``NFQNL_COPY_META``), and GSO packets are taken whole, so a
bulk transfer costs one verdict per 64 KiB, not per 1500 bytes.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import socket
import struct
import time

__all__ = ["Delayer"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
_QUEUE = 3 << 8  # NFNL_SUBSYS_QUEUE
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = _QUEUE | 0, _QUEUE | 1, _QUEUE | 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP, NF_ACCEPT = 0, 1
QUEUE_MAXLEN = 10_000  # packets held at once; netem's default limit is 1000


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    payload = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs  # nfgenmsg: family, version, res_id
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _packet_ids(buffer: bytes) -> list[int]:
    """Packet ids of the NFQNL_MSG_PACKET messages in one read."""
    ids, offset = [], 0
    while offset + 16 <= len(buffer):
        length, kind = struct.unpack_from("=IH", buffer, offset)
        if length < 16:
            break
        if kind == NFQNL_MSG_PACKET:
            at, end = offset + 20, offset + length  # past nlmsghdr (16) and nfgenmsg (4)
            while at + 4 <= end:
                attr_len, attr_kind = struct.unpack_from("=HH", buffer, at)
                if attr_len < 4:
                    break
                if attr_kind & 0x3FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", buffer, at + 4)[0])
                    break
                at += (attr_len + 3) & ~3
        elif kind == NLMSG_ERROR:
            error = struct.unpack_from("=i", buffer, offset + 16)[0]
            if error:
                raise OSError(-error, f"netfilter queue: {os.strerror(-error)}")
        offset += (length + 3) & ~3
    return ids


class Delayer:
    def __init__(self, queue: int, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
        self.queue, self.delay, self.jitter, self.loss = queue, delay_ms / 1000, jitter_ms / 1000, loss_pct / 100
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): bursts of packets
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
                        + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                        + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))
        self.sock.setblocking(False)

    def _configure(self, attrs: bytes) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        _packet_ids(self.sock.recv(4096))  # the ack; raises on an error

    def _verdict(self, packet_id: int, verdict: int) -> bytes:
        return _message(NFQNL_MSG_VERDICT, self.queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))

    def run(self) -> None:
        held: list[tuple[float, int]] = []  # (due, packet id), soonest first
        while True:
            wait = max(0.0, held[0][0] - time.monotonic()) if held else None
            select.select([self.sock], [], [], wait)
            now = time.monotonic()
            out = []
            while True:
                try:
                    ids = _packet_ids(self.sock.recv(1 << 18))
                except BlockingIOError:
                    break
                for packet_id in ids:
                    if self.loss and random.random() < self.loss:
                        out.append(self._verdict(packet_id, NF_DROP))
                    else:
                        spread = random.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
                        heapq.heappush(held, (now + max(0.0, self.delay + spread), packet_id))
            now = time.monotonic()
            while held and held[0][0] <= now:
                out.append(self._verdict(heapq.heappop(held)[1], NF_ACCEPT))
            for start in range(0, len(out), 512):  # one send per few hundred verdicts
                self.sock.send(b"".join(out[start:start + 512]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    args = parser.parse_args()
    delayer = Delayer(args.queue, args.delay_ms, args.jitter_ms, args.loss_pct)
    print("bound", flush=True)
    delayer.run()


if __name__ == "__main__":
    main()
