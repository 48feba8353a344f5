"""Starvation: how long a good message waits while other connections hold libmilter's workers.

Each trial starts a fresh `pymilterkit run` of the filter below on a unix socket in a temp dir,
measures a good message's latency on the idle milter (`idle_ref_s`, the reference of the same
run), applies a load and measures the good message again (`good_s`: the `pymilterkit.testing`
wire client, one new connection `--delay` seconds after the load, 2 recipients,
`X-Rcpt-Count: 2` checked). Meanwhile a thread sends good messages back to back from before the
load until then (`during_n` of them, the slowest `during_max_s`). Loads:

* `slow`: N connections (default 10) each send an RCPT whose `on_rcpt` sleeps S seconds
  (default 5). By default each connection goes step by step, as an MTA does; `--together`: all
  first reach MAIL, then send their RCPTs at once; `--burst`: raw connections opened back to back,
  each sending negotiate..RCPT in one write, followed in the same burst by a good connection
  sending a whole message the same way (`good_in_burst_s`). `slow_rcpt_s`: the slow RCPTs' own
  answer times (step by step and `--together` only).
* `half`: N connections (default 100) each send the first 5 bytes of a 13-byte packet and hold
  it (`--negotiated`: each negotiates first, then sends half a CONNECT).
* `emfile`: under `prlimit --nofile=256:256`, 300 idle connections (more than the milter can
  accept); the milter's CPU share over 3 s, then whether a good message is served (5 s wait).

    python3 benchmarks/starvation.py                       # slow and half, 3 trials each
    python3 benchmarks/starvation.py slow --burst --delay 0 --trials 10
    python3 benchmarks/starvation.py half --timeout 10 --trials 5
    python3 benchmarks/starvation.py emfile

Prints one JSON line per trial. A good message not answered within `--wait` seconds is `null`
(starved). Latencies are wall-clock on a shared machine: compare a loaded figure with the idle
reference of the same trial, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typing_extensions import override  # noqa: E402

from examples.rcpt_count import RcptCount  # noqa: E402
from pymilterkit import Actions, EsmtpParams, MilterError, Status  # noqa: E402
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess  # noqa: E402
from pymilterkit.testing import _wire as w  # noqa: E402

MESSAGE = b"Subject: starvation\r\n\r\nbody\r\n"


class SlowRcpt(RcptCount):
    """examples/rcpt_count.py's counter; an RCPT to `sleep-S@...` sleeps S s (at most 60) first."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.strip("<>").split("@")[0]
        if local.startswith("sleep-"):
            time.sleep(min(float(local[len("sleep-"):]), 60.0))
        return super().on_rcpt(recipient, params)


class Milter(MilterProcess):
    """`pymilterkit run` of SlowRcpt, optionally under `prlimit --nofile`."""

    def __init__(self, args: list[str], nofile: str | None = None) -> None:
        super().__init__(f"{Path(__file__).resolve()}:SlowRcpt", args=args, cwd=ROOT)
        self.nofile = nofile

    @override
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("DEBUG")] = "INFO"  # DEBUG logs every callback; it is not what we measure
        return cmd if self.nofile is None else ["prlimit", f"--nofile={self.nofile}", "--", *cmd]


def good_latency(spec: str, wait: float) -> float | None:
    """Seconds until a good message is fully answered; None if not within `wait`."""
    start = time.monotonic()
    try:
        result = MilterClient(spec, timeout=wait).run(MESSAGE, recipients=["a@x.org", "b@x.org"])
    except MilterError:
        return None
    headers = [(m.name, m.value) for m in result.modifications if isinstance(m, HeaderAdded)]
    assert result.status is Status.CONTINUE and headers == [("X-Rcpt-Count", "2")], result
    return time.monotonic() - start


def reference(spec: str) -> float:
    lat = [good_latency(spec, 10.0) for _ in range(3)]
    assert all(x is not None for x in lat), lat
    return statistics.median(x for x in lat if x is not None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slow_load(
    milter: MilterProcess, n: int, seconds: float, together: bool, done: list[float]
) -> list[threading.Thread]:
    ready = threading.Barrier(n + 1)

    def one() -> None:
        if not together:
            ready.wait()
        conn = MilterClient(milter.socket, timeout=seconds * n + 60).open()
        try:
            conn.negotiate()
            conn.connect("slow.example.net", None)
            conn.helo("slow.example.net")
            conn.mail("<s@example.net>")
            if together:
                ready.wait()
            start = time.monotonic()
            conn.rcpt(f"<sleep-{seconds}@example.org>")
            done.append(time.monotonic() - start)
            conn.quit()
        except MilterError:
            pass
        finally:
            conn.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()  # all connect now, or (together) all are past MAIL: their RCPTs go out now
    return threads


def connected(milter: MilterProcess) -> socket.socket:
    """A raw connection to the milter's unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(milter.socket.split(":", 1)[1])
    return s


def _opening(host: bytes) -> list[bytes]:
    return [
        w.encode_packet(b"O", w.encode_optneg(6, int(Actions.ADD_HEADER), 0)),
        w.encode_packet(b"C", w.encode_connect(host, None)),
        w.encode_packet(b"H", w.cstr(host)),
        w.encode_packet(b"M", w.encode_argv([b"<s@example.net>"])),
    ]


def burst_load(milter: MilterProcess, n: int, seconds: float) -> tuple[list[socket.socket], float]:
    """N connections, each sending negotiate..RCPT(sleep) in one write, back to back; then,
    in the same burst, a good one sending a whole message the same way.

    Returns the sockets and the good message's latency (seconds until its end-of-message
    answer, `X-Rcpt-Count: 2` checked), or -1 if it never came.
    """
    slow = b"".join([
        *_opening(b"burst.example.net"),
        w.encode_packet(b"R", w.encode_argv([f"<sleep-{seconds}@example.org>".encode()])),
    ])
    good = b"".join([
        *_opening(b"good.example.net"),
        w.encode_packet(b"R", w.encode_argv([b"<a@x.org>"])),
        w.encode_packet(b"R", w.encode_argv([b"<b@x.org>"])),
        w.encode_packet(b"L", w.cstr(b"Subject") + w.cstr(b"burst")),
        w.encode_packet(b"N"),
        w.encode_packet(b"B", b"body\r\n"),
        w.encode_packet(b"E"),
    ])
    held = []
    for _ in range(n):
        held.append(connected(milter))
        held[-1].sendall(slow)
    start = time.monotonic()
    g = connected(milter)
    held.append(g)
    g.sendall(good)
    g.settimeout(seconds * n + 30)
    reader = w.PacketReader()
    header = None
    while True:
        packet = reader.next_packet()
        if packet is None:
            try:
                data = g.recv(65536)
            except OSError:
                return held, -1.0
            if not data:
                return held, -1.0
            reader.feed(data)
            continue
        if packet[0] == b"h":
            header = packet[1]
        elif header is not None:  # the end-of-message verdict after the header
            assert header == b"X-Rcpt-Count\0" + b"2\0" and packet[0] == b"c", (header, packet)
            return held, time.monotonic() - start


def half_load(milter: MilterProcess, n: int, negotiated: bool) -> list[socket.socket]:
    held = [connected(milter) for _ in range(n)]
    if negotiated:  # each negotiates first and waits for the answer: a parked session
        optneg = w.encode_packet(b"O", w.encode_optneg(6, int(Actions.ADD_HEADER), 0))
        for s in held:
            s.sendall(optneg)
            reader = w.PacketReader()
            while reader.next_packet() is None:
                reader.feed(s.recv(4096))
        half = w.encode_packet(b"C", w.encode_connect(b"half.example.net", None))[:7]
    else:
        half = struct.pack(">I", 13) + b"O\0\0\0\x06"  # optneg says 13 bytes, sends 5
    for s in held:  # then, back to back, each sends the first half of a packet and holds
        s.sendall(half)
    return held


def trial(kind: str, a: argparse.Namespace) -> dict[str, object]:
    extra = [] if a.timeout is None else ["--timeout", str(a.timeout)]
    extra += [] if a.workers == 1 else ["--workers", str(a.workers)]
    out: dict[str, object] = {"load": kind, "timeout": a.timeout, "workers": a.workers}
    if kind == "emfile":
        with Milter(extra, nofile="256:256") as m:
            out["idle_ref_s"] = round(reference(m.socket), 4)
            idle = [connected(m) for _ in range(300)]
            time.sleep(1.0)
            out["milter_fds"] = len(os.listdir(f"/proc/{m.pid}/fd"))
            c0, t0 = cpu_seconds(m.pid), time.monotonic()
            time.sleep(3.0)
            out["cpu_share"] = round((cpu_seconds(m.pid) - c0) / (time.monotonic() - t0), 2)
            out["good_s"] = good_latency(m.socket, 5.0)
            for s in idle:
                s.close()
        return out
    n = a.connections or (10 if kind == "slow" else 100)
    out["connections"] = n
    with Milter(extra) as m:
        out["idle_ref_s"] = round(reference(m.socket), 4)
        threads: list[threading.Thread] = []
        held: list[socket.socket] = []
        done: list[float] = []
        during: list[float | None] = []
        stop = threading.Event()

        def steady() -> None:  # good messages back to back while the load arrives
            while not stop.is_set():
                during.append(good_latency(m.socket, a.wait))

        steady_thread = threading.Thread(target=steady, daemon=True)
        steady_thread.start()
        if kind == "slow":
            out["sleep_s"] = a.sleep
            out["delay_s"] = a.delay
            out["style"] = "burst" if a.burst else "together" if a.together else "steps"
            if a.burst:
                held, in_burst = burst_load(m, n, a.sleep)
                out["good_in_burst_s"] = round(in_burst, 3)
            else:
                threads = slow_load(m, n, a.sleep, a.together, done)
        else:
            out["negotiated"] = a.negotiated
            held = half_load(m, n, a.negotiated)
        time.sleep(a.delay)
        lat = good_latency(m.socket, a.wait)
        out["good_s"] = None if lat is None else round(lat, 3)
        stop.set()
        steady_thread.join(a.wait + 5)
        out["during_n"] = len(during)
        answered = [x for x in during if x is not None]
        out["during_max_s"] = None if None in during else round(max(answered, default=0), 3)
        for s in held:
            s.close()
        for t in threads:
            t.join(a.sleep * n + 60)
        if kind == "slow":
            out["slow_rcpt_s"] = sorted(round(x, 1) for x in done)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loads", nargs="*", choices=["slow", "half", "emfile"], default=[])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--connections", type=int, default=0, help="10 for slow, 100 for half")
    ap.add_argument("--sleep", type=float, default=5.0, help="on_rcpt sleep of `slow` (s)")
    ap.add_argument("--burst", action="store_true",
                    help="slow: raw connections, each sends negotiate..RCPT in one write")
    ap.add_argument("--negotiated", action="store_true",
                    help="half: each connection negotiates first, then sends half a CONNECT")
    ap.add_argument("--together", action="store_true",
                    help="slow: the connections first all reach MAIL, then send RCPT at once")
    ap.add_argument("--delay", type=float, default=0.3,
                    help="seconds between the load and the good message")
    ap.add_argument("--timeout", type=int, default=None, help="the milter's --timeout")
    ap.add_argument("--workers", type=int, default=1, help="the milter's --workers")
    ap.add_argument("--wait", type=float, default=40.0, help="give up on the good message (s)")
    a = ap.parse_args()
    for kind in a.loads or ["slow", "half"]:
        for _ in range(1 if kind == "emfile" else a.trials):
            print(json.dumps(trial(kind, a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
