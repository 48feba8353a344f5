"""Slow lookups: many connections whose `on_rcpt` waits on a 1 s lookup, async vs sync filter.

One run starts a local lookup server (HTTP/1.0 on 127.0.0.1, its own thread and event loop:
each request is answered `accept` or `reject` after `--delay` seconds; the verdict is a hash
of the recipient's local part, so the client knows what to expect) and then, for each filter
of `slow_filters.py` (`SlowAsync`: `async def on_rcpt` with `asyncio.open_connection`;
`SlowSync`: blocking sockets), a fresh `pymilterkit run` (default settings, one process, unix
socket in a temp dir, log level INFO) and this load, from an asyncio milter client:

* `--connections` (200) connections each negotiate and reach MAIL step by step; then all send
  their RCPT at once (each message: MAIL, one looked-up RCPT; accepted: one header, EOH, body,
  EOM) and go on with `--messages` messages each. Every answer is checked: RCPT `c` or
  `550 5.1.1` as the server decided, EOM `X-Accepted: 1` then `c`. Throughput = answered
  messages / seconds from the RCPTs' start to the last answer; the ideal is connections /
  delay (200 msg/s).
* meanwhile good messages (a new connection, a `fast-...` recipient the filter answers without
  a lookup, whole message, `X-Accepted: 1` checked) every `--good-interval` s: their latency.
* the milter's RSS and thread count (sampled every 0.1 s; the peak), its CPU, and the most
  lookups the server saw in flight at once.

The sync filter gets `--sync-messages` (3) messages per connection; each filter's load runs at
most `--cap` (60) s (then `msg/s` = answered / cap), good messages still running get
`--good-wait` (10) s more.
With it libmilter's worker pool holds one thread per blocked lookup, and a burst of ready sessions
is queued for the few idle ones; what is not answered by the cap is counted as such.

    python3 benchmarks/slow_lookups.py                    # both filters, 200 connections
    python3 benchmarks/slow_lookups.py --filters async --connections 200 --messages 5
    python3 benchmarks/slow_lookups.py --connections 5 --delay 0.2 --cap 10   # smoke

Prints one JSON line per filter and a table; `--json PATH` also writes them to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import tree_cpu  # noqa: E402
from typing_extensions import override  # noqa: E402

from pymilterkit import Actions, ProtocolOpts  # noqa: E402
from pymilterkit.testing import MilterProcess  # noqa: E402
from pymilterkit.testing import _wire as w  # noqa: E402

FILTERS = {"async": "SlowAsync", "sync": "SlowSync"}
P = ProtocolOpts


def verdict(local: str) -> str:
    """What the lookup server answers for a local part (the client expects the same)."""
    return "reject" if zlib.crc32(local.encode()) % 4 == 0 else "accept"


# -- the lookup server -------------------------------------------------------------------------


class LookupServer:
    """HTTP/1.0 on 127.0.0.1: `GET /rcpt/<local>` -> `accept`/`reject` after `delay` s."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the lookup server did not start")

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=2048))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.in_flight -= 1
            body = verdict(path.rsplit("/", 1)[1]).encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def reset(self) -> None:
        self.requests = self.max_in_flight = 0

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the MTA side ------------------------------------------------------------------------------


class Wrong(Exception):
    """An answer that is not the expected one."""


class Conn:
    """One MTA-side milter connection (protocol 6), honouring the negotiated stages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.proto = P.NONE

    @classmethod
    async def open(cls, path: str) -> Conn:
        for attempt in range(50):  # a full listen backlog: try again shortly
            try:
                return cls(*await asyncio.open_unix_connection(path))
            except (BlockingIOError, ConnectionRefusedError):
                await asyncio.sleep(0.01 * (attempt + 1))
        raise Wrong("could not connect")

    async def packet(self) -> tuple[bytes, bytes]:
        while True:
            size = int.from_bytes(await self.reader.readexactly(4), "big")
            data = await self.reader.readexactly(size)
            if data[:1] != b"p":  # progress: keep waiting
                return data[:1], data[1:]

    async def send(self, cmd: bytes, data: bytes, off: P, nr: P) -> tuple[bytes, bytes] | None:
        """Send one stage (unless negotiated away); its answer (None if it has none)."""
        if self.proto & off:
            return None
        self.writer.write(w.encode_packet(cmd, data))
        if self.proto & nr:
            return None
        await self.writer.drain()
        return await self.packet()

    async def expect(self, cmd: bytes, data: bytes, off: P, nr: P) -> None:
        answer = await self.send(cmd, data, off, nr)
        if answer is not None and answer[0] != b"c":
            raise Wrong(f"{cmd!r}: {answer!r}")

    async def opening(self, host: bytes) -> None:
        self.writer.write(w.encode_packet(b"O", w.encode_optneg(6, int(Actions.ADD_HEADER),
                                                                0x1FFFFF)))
        await self.writer.drain()
        cmd, data = await self.packet()
        if cmd != b"O":
            raise Wrong(f"negotiate: {cmd!r}")
        self.proto = w.decode_optneg(data)[2]
        await self.expect(b"C", w.encode_connect(host, None), P.NO_CONNECT, P.NR_CONN)
        await self.expect(b"H", w.cstr(host), P.NO_HELO, P.NR_HELO)

    async def message(self, local: str, expected: str) -> None:
        """One message to `local`@example.org; raises Wrong unless answered as `expected`."""
        await self.expect(b"M", w.encode_argv([b"<s@example.net>"]), P.NO_MAIL, P.NR_MAIL)
        await self.rcpt(local, expected)
        await self.rest(expected)

    async def rcpt(self, local: str, expected: str) -> None:
        answer = await self.send(b"R", w.encode_argv([f"<{local}@example.org>".encode()]),
                                 P.NO_RCPT, P.NR_RCPT)
        want = (b"c", b"") if expected == "accept" else (b"y", b"550 5.1.1 rejected by the "
                                                                b"lookup\0")
        if answer != want:
            raise Wrong(f"RCPT {local}: {answer!r}, want {want!r}")

    async def rest(self, expected: str) -> None:
        if expected == "reject":  # no recipient left: the MTA ends the transaction
            self.writer.write(w.encode_packet(b"A"))
            return
        await self.expect(b"T", b"", P.NO_DATA, P.NR_DATA)
        await self.expect(b"L", w.cstr(b"Subject") + w.cstr(b"slow"), P.NO_HDRS, P.NR_HDR)
        await self.expect(b"N", b"", P.NO_EOH, P.NR_EOH)
        await self.expect(b"B", b"body\r\n", P.NO_BODY, P.NR_BODY)
        answers = [await self.send(b"E", b"", P.NONE, P.NONE)]
        while answers[-1] is not None and answers[-1][0] == b"h":
            answers.append(await self.packet())
        if answers != [(b"h", b"X-Accepted\0" + b"1\0"), (b"c", b"")]:
            raise Wrong(f"EOM: {answers!r}")
        self.writer.write(w.encode_packet(b"A"))

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.write(w.encode_packet(b"Q"))
            self.writer.close()
            await self.writer.wait_closed()


async def load(path: str, pid: int, a: argparse.Namespace, messages: int,
               tag: str) -> dict[str, Any]:
    conns: list[Conn] = []
    opening = asyncio.Semaphore(32)  # negotiate step by step, a few at a time

    async def open_one(i: int) -> Conn:
        async with opening:
            conn = await Conn.open(path)
            await conn.opening(b"slow.example.net")
            await conn.expect(b"M", w.encode_argv([b"<s@example.net>"]), P.NO_MAIL, P.NR_MAIL)
            return conn

    conns = list(await asyncio.gather(*(open_one(i) for i in range(a.connections))))
    done: list[float] = []
    wrong: list[str] = []
    go = asyncio.Event()
    finished = asyncio.Event()

    async def slow(i: int, conn: Conn) -> None:
        await go.wait()
        try:
            for m in range(messages):
                local = f"{tag}{i}-{m}"
                if m:
                    await conn.message(local, verdict(local))
                else:  # MAIL was sent before the start
                    await conn.rcpt(local, verdict(local))
                    await conn.rest(verdict(local))
                done.append(time.monotonic())
        except (Wrong, OSError, asyncio.IncompleteReadError) as exc:
            wrong.append(f"{type(exc).__name__}: {exc}"[:200])

    good: list[float | None] = []

    async def good_one(n: int) -> None:
        start = time.monotonic()
        conn = None
        try:
            conn = await Conn.open(path)
            await conn.opening(b"good.example.net")
            await conn.message(f"fast-{tag}{n}", "accept")
            good.append(time.monotonic() - start)
        except (Wrong, OSError, asyncio.IncompleteReadError) as exc:
            wrong.append(f"good: {type(exc).__name__}: {exc}"[:200])
        finally:
            if conn is not None:
                await conn.close()

    async def goods() -> None:
        tasks = []
        n = 0
        await asyncio.sleep(min(0.1, a.good_interval))
        while not finished.is_set() and n < a.good_max:
            tasks.append(asyncio.create_task(good_one(n)))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), a.good_interval)
        if tasks:  # the last ones may have started just before the load ended
            await asyncio.wait(tasks, timeout=a.good_wait)
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        good.extend([None] * len(pending))  # not answered `good_wait` s after the load

    peak = {"rss": 0, "threads": 0}

    async def sample() -> None:
        while True:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                peak["rss"] = max(peak["rss"], int(fields["VmRSS"].split()[0]))
                peak["threads"] = max(peak["threads"], int(fields["Threads"]))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    rss_before = _rss_kib(pid)
    tasks = [asyncio.create_task(slow(i, c)) for i, c in enumerate(conns)]
    good_task = asyncio.create_task(goods())
    cpu0 = tree_cpu(pid)
    await asyncio.sleep(0.05)  # every connection waits at `go`
    t0 = time.monotonic()
    go.set()
    _, late = await asyncio.wait(tasks, timeout=a.cap)
    elapsed = (max(done) if done and not late else time.monotonic()) - t0
    cpu = tree_cpu(pid) - cpu0
    finished.set()
    for t in late:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await good_task
    sampler.cancel()
    for conn in conns:
        await conn.close()
    total = a.connections * messages
    answered = [g for g in good if g is not None]
    return {
        "connections": a.connections, "messages": total, "answered": len(done),
        "wrong": len(wrong), "wrong_first": wrong[:3], "capped": bool(late),
        "seconds": round(elapsed, 3), "msg_per_s": round(len(done) / elapsed, 1),
        "ideal_msg_per_s": round(a.connections / a.delay, 1),
        "x_ideal": round(len(done) / elapsed / (a.connections / a.delay), 3),
        "good_n": len(good), "good_unanswered": len(good) - len(answered),
        "good_p50_s": round(statistics.median(answered), 4) if answered else None,
        "good_max_s": round(max(answered), 4) if answered else None,
        "milter_rss_before_kib": rss_before, "milter_rss_peak_kib": peak["rss"],
        "milter_threads_peak": peak["threads"],
        "milter_cpu_ms_per_msg": round(cpu / max(len(done), 1) * 1e3, 3),
    }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Milter(MilterProcess):
    """`pymilterkit run benchmarks/slow_filters.py:<Filter>`, log level INFO."""

    @override
    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("DEBUG")] = "INFO"  # DEBUG logs every callback
        return cmd


def run_filter(kind: str, server: LookupServer, a: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PMK_LOOKUP=f"127.0.0.1:{server.port}")
    messages = a.messages if kind == "async" else a.sync_messages
    server.reset()
    with Milter(f"{HERE / 'slow_filters.py'}:{FILTERS[kind]}", env=env, cwd=ROOT) as m:
        path = m.socket.split(":", 1)[1]
        out = asyncio.run(load(path, m.pid, a, messages, tag=f"{kind}-"))
        stop_start = time.monotonic()
        code = m.stop()
        out["stop_s"] = round(time.monotonic() - stop_start, 2)
        out["exit"] = code
        out["tracebacks"] = m.log().count("Traceback")
    lookups = sum(1 for i in range(a.connections) for _ in range(messages))
    out.update(filter=kind, delay_s=a.delay, lookups=server.requests,
               lookups_expected=lookups, lookups_max_in_flight=server.max_in_flight,
               cap_s=a.cap)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'filter':<6} {'conns':>5} {'msgs':>5} {'answered':>8} {'wrong':>5} "
             f"{'seconds':>7} {'msg/s':>7} {'x ideal':>7} {'in flight':>9} {'good p50':>9} "
             f"{'good max':>9} {'unans':>5} {'RSS MB':>6} {'peak':>6} {'thr':>4} "
             f"{'cpu ms/msg':>10}"]
    for r in rows:
        good50 = "-" if r["good_p50_s"] is None else f"{r['good_p50_s']:.3f}"
        goodmax = "-" if r["good_max_s"] is None else f"{r['good_max_s']:.3f}"
        lines.append(
            f"{r['filter']:<6} {r['connections']:>5} {r['messages']:>5} {r['answered']:>8} "
            f"{r['wrong']:>5} {r['seconds']:>7.2f}{'*' if r['capped'] else ' '}"
            f"{r['msg_per_s']:>7.1f} {r['x_ideal']:>7.3f} {r['lookups_max_in_flight']:>9} "
            f"{good50:>9} {goodmax:>9} {r['good_unanswered']:>5} "
            f"{r['milter_rss_before_kib'] / 1024:>6.1f} {r['milter_rss_peak_kib'] / 1024:>6.1f} "
            f"{r['milter_threads_peak']:>4} {r['milter_cpu_ms_per_msg']:>10.3f}")
    lines.append("(* = stopped at the cap; good p50/max in s over the answered good messages; "
                 "RSS before the load and peak)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--filters", nargs="+", choices=list(FILTERS), default=list(FILTERS))
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--messages", type=int, default=3, help="messages per connection (async)")
    ap.add_argument("--sync-messages", type=int, default=3, help="messages per connection (sync)")
    ap.add_argument("--delay", type=float, default=1.0, help="the lookup's delay (s)")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds a load may run at most")
    ap.add_argument("--good-interval", type=float, default=0.25,
                    help="seconds between good messages during the load")
    ap.add_argument("--good-max", type=int, default=40, help="good messages at most")
    ap.add_argument("--good-wait", type=float, default=10.0,
                    help="seconds the good messages still running get after the load")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    server = LookupServer(a.delay)
    rows = []
    try:
        for kind in a.filters:
            row = run_filter(kind, server, a)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.stop()
    print(table(rows))
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = any(r["wrong"] or r["exit"] != 0 or r["tracebacks"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
