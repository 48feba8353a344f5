"""Whole-message filters (issue 29.8): `on_message` against the same filter written by hand.

Both filters parse the message with the standard `email` package and add one header
(`X-Parts: <number of MIME parts>`): `Whole` on `on_message`, `ByHand` the way
`examples/footer.py` was written before (answered `on_header`/`on_body` collecting into lists
and a bytearray, `BytesParser` at `on_eom`). Each size (1 KiB, 100 KiB, 1 MiB, 20 MiB of body)
runs through a fresh `pymilterkit run` of each filter in turn (ABAB, `--reps`), messages sent
one after another on one connection by the MTA-side client; figures: msg/s and the milter's CPU
per message (utime+stime), medians.

`--rss`: 16 connections send a 20 MiB message at once, to `Whole`, to `Headers` (`on_message`
that reads `message.headers` and never parses) and to `ByHand`; the milter's peak RSS (VmHWM)
against the bound 16 x spool threshold + 50 MiB.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/content.py [--reps 3] [--rss]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Message, MilterSession, Status
from pymilterkit.testing import Envelope, MilterClient, MilterProcess

HERE = Path(__file__).resolve()
SIZES = {"1KiB": 1024, "100KiB": 100 * 1024, "1MiB": 1024 * 1024, "20MiB": 20 * 1024 * 1024}
THRESHOLD = 1024 * 1024


class Whole(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        mail["X-Parts"] = str(sum(1 for _ in mail.walk()))
        return Status.CONTINUE


class Headers(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_message(self, message: Message) -> Status:
        self.add_header("X-Headers", str(len(message.headers)))
        return Status.CONTINUE


class ByHand(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append((name, value))
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.body += chunk
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        head = b"".join(f"{n}: {v}\r\n".encode("utf-8", "surrogateescape")
                        for n, v in self.headers)
        mail = BytesParser(policy=default).parsebytes(head + b"\r\n" + bytes(self.body))
        self.add_header("X-Parts", str(sum(1 for _ in mail.walk())))
        self.body = bytearray()
        return Status.CONTINUE


def message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return (b"From: a@example.net\r\nTo: b@example.org\r\nSubject: benchmark\r\n"
            b"Content-Type: text/plain\r\n\r\n" + line * max(1, size // len(line)))


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status(pid: int, key: str) -> float:
    """A /proc/PID/status figure in MiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def start(name: str) -> MilterProcess:
    """A fresh `pymilterkit run` of filter `name` (started and stopped by `with`)."""
    return MilterProcess(f"{HERE}:{name}", args=["--spool-threshold", str(THRESHOLD)])


def throughput(name: str, size: int, count: int) -> tuple[float, float]:
    """(msg/s, CPU ms per message) for `count` messages of `size` on one connection."""
    raw = message(size)
    pairs = [(Envelope(), raw)] * count
    with start(name) as process:
        client = MilterClient(process.socket, timeout=120)
        client.run_connection(pairs[:2])  # warm-up
        before, t0 = cpu(process.pid), time.perf_counter()
        result = client.run_connection(pairs)
        elapsed, used = time.perf_counter() - t0, cpu(process.pid) - before
    assert all(m.header("X-Parts") in (" 1", "1") for m in result.messages), result.messages[0]
    return count / elapsed, used / count * 1000


def rss(name: str, connections: int = 16) -> tuple[float, float]:
    """(RSS before, peak RSS) in MiB with `connections` 20 MiB messages at once."""
    raw = message(SIZES["20MiB"])
    with start(name) as process:
        client = MilterClient(process.socket, timeout=300)
        client.run(message(1024))
        before = status(process.pid, "VmRSS")
        errors: list[BaseException] = []

        def send() -> None:
            try:
                client.run(raw)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send) for _ in range(connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        return before, status(process.pid, "VmHWM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement, roughly")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--rss", action="store_true", help="also the 16 x 20 MiB RSS run")
    args = parser.parse_args(argv)
    print(f"{'size':>7} {'filter':>7} {'msg/s':>9} {'CPU ms/msg':>11}   ratio on_message/by hand")
    for label in args.sizes:
        size = SIZES[label]
        _, first = throughput("Whole", size, 2)
        count = max(3, min(2000, int(args.seconds / max(first / 1000, 1e-4))))
        runs: dict[str, list[tuple[float, float]]] = {"Whole": [], "ByHand": []}
        for _ in range(args.reps):
            for name in runs:
                runs[name].append(throughput(name, size, count))
        medians = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                   for n, v in runs.items()}
        for name, (rate, ms) in medians.items():
            print(f"{label:>7} {name:>7} {rate:9.1f} {ms:11.3f}", end="")
            if name == "ByHand":
                whole = medians["Whole"]
                print(f"   msg/s x{whole[0] / rate:.2f}, CPU x{whole[1] / ms:.2f}", end="")
            print()
        sys.stdout.flush()
    if args.rss:
        bound = 16 * THRESHOLD / 2**20 + 50
        for name in ("Headers", "Whole", "ByHand"):
            before, peak = rss(name)
            print(f"RSS 16 x 20 MiB {name:>7}: {before:.1f} MiB idle, peak {peak:.1f} MiB "
                  f"(bound {bound:.0f} MiB: {'within' if peak <= bound else 'over'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
