"""Session-tagged logs: `MilterSession.log` and the library's own records carry the session id,
queue id, stage, client address and worker PID; text, JSON and syslog output; levels."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from typing_extensions import override

from pymilterkit import (
    ConfigurationError,
    EsmtpParams,
    InetAddress,
    MilterSession,
    Status,
    _logging,
)
from pymilterkit.testing import ClientInfo, Envelope, Harness

PID = os.getpid()


class Chatty(MilterSession):
    """Logs at MAIL, RCPT and end of message; raises for recipient `raise@`."""

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.log.info("mail from %s", sender)
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.startswith("<raise@"):
            raise RuntimeError("no\r\nFAKE LINE")
        if recipient.startswith("<garbage@"):
            return "no status"  # type: ignore[return-value]
        self.log.warning("rcpt %s", recipient, extra={"mine": 1})
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.log.info("done")
        return Status.CONTINUE


def envelope(qid: str, *recipients: str) -> Envelope:
    return Envelope.of("a@example.net", list(recipients) or ["b@example.org"], queue_id=qid)


MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"
CLIENT = ClientInfo("mx.example.net", InetAddress(ip_address("198.51.100.7"), 2525))


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pymilterkit")]


def fields(record: logging.LogRecord) -> tuple[object, ...]:
    return (record.__dict__.get("session_id"), record.__dict__.get("queue_id"),
            record.__dict__.get("stage"), record.__dict__.get("client"), record.process)


def test_session_log_records_carry_the_session_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymilterkit")
    harness = Harness(Chatty, client=CLIENT)
    harness.run_connection([(envelope("QID1"), MESSAGE), (envelope("QID2"), MESSAGE)])
    harness.run(MESSAGE, envelope=envelope("QID3"))
    logged = records(caplog)
    assert [r.getMessage() for r in logged] == [
        "mail from <a@example.net>", "rcpt <b@example.org>", "done",
        "mail from <a@example.net>", "rcpt <b@example.org>", "done",
        "mail from <a@example.net>", "rcpt <b@example.org>", "done",
    ]
    first = logged[0].__dict__["session_id"]
    assert isinstance(first, str) and first.startswith(f"{PID}-")
    number = int(first.split("-")[1])
    second = f"{PID}-{number + 1}"
    # Before RCPT Postfix has no queue id (the harness sends `i` from RCPT on, like Postfix).
    assert [fields(r) for r in logged] == [
        (first, None, "on_mail", "198.51.100.7", PID),
        (first, "QID1", "on_rcpt", "198.51.100.7", PID),
        (first, "QID1", "on_eom", "198.51.100.7", PID),
        (first, None, "on_mail", "198.51.100.7", PID),  # a new MAIL clears RCPT's macros
        (first, "QID2", "on_rcpt", "198.51.100.7", PID),
        (first, "QID2", "on_eom", "198.51.100.7", PID),
        (second, None, "on_mail", "198.51.100.7", PID),  # a new connection, a new id
        (second, "QID3", "on_rcpt", "198.51.100.7", PID),
        (second, "QID3", "on_eom", "198.51.100.7", PID),
    ]
    assert logged[0].name == "pymilterkit.filter.Chatty"
    assert logged[1].__dict__["mine"] == 1  # the caller's own extra is kept


def test_the_librarys_records_about_a_session_carry_the_same_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pymilterkit")
    client = ClientInfo("h.example", InetAddress(ip_address("2001:db8::5"), 1),
                        macros={"connect": {"{client_addr}": "2001:db8::5"}})
    harness = Harness(Chatty, client=client)
    result = harness.run(MESSAGE, envelope=envelope("QIDR", "raise@example.org"))
    assert result.status is Status.TEMPFAIL
    harness.run(MESSAGE, envelope=envelope("QIDG", "garbage@example.org"))
    errors = [r for r in records(caplog) if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "Chatty.on_rcpt raised RuntimeError; answering TEMPFAIL",
        "Chatty.on_rcpt returned 'no status', not a Status; answering TEMPFAIL",
    ]
    assert [fields(r)[1:] for r in errors] == [
        ("QIDR", "on_rcpt", "2001:db8::5", PID),
        ("QIDG", "on_rcpt", "2001:db8::5", PID),
    ]
    assert all(str(r.__dict__["session_id"]).startswith(f"{PID}-") for r in errors)
    assert errors[0].__dict__["session_id"] != errors[1].__dict__["session_id"]
    assert errors[0].exc_text is not None
    assert "no\\r\\nFAKE LINE" in errors[0].exc_text  # control characters stay escaped


def test_records_not_about_a_session_have_empty_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymilterkit")
    logging.getLogger("pymilterkit").info("listening")
    Chatty().log.info("outside any connection")  # a session no runner created
    first, second = records(caplog)
    assert fields(first) == (None, None, None, None, PID)
    assert fields(second) == (None, None, None, None, PID)


def test_a_record_that_is_not_emitted_is_not_worked_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="pymilterkit")
    looked_up: list[bytes] = []

    class Spy(MilterSession):
        @override
        def on_eom(self) -> Status:
            backend = self._pmk_backend
            assert backend is not None
            real = backend.getsymval

            def spying(name: bytes) -> bytes | None:
                looked_up.append(name)
                return real(name)

            backend.getsymval = spying  # type: ignore[method-assign]
            self.log.info("below the level")
            assert looked_up == []
            self.log.error("emitted")
            assert b"i" in looked_up
            return Status.CONTINUE

    assert Harness(Spy).run(MESSAGE).status is Status.CONTINUE
    assert [r.getMessage() for r in records(caplog)] == ["emitted"]


# -- formats and set-up ----------------------------------------------------------------------


@pytest.fixture
def clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger("pymilterkit")
    saved = root.handlers[:], root.level, ours.level
    root.handlers = []
    yield
    if _logging._handler is not None:
        _logging._handler.close()
        _logging._handler = None
    root.handlers, root.level = saved[0], saved[1]
    ours.setLevel(saved[2])


class Fails(MilterSession):
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.log.info("about to fail\x1b[31m")
        raise ValueError("bad\ninput")


def emit_error_in_a_session(name: str = "QIDJ") -> None:
    Harness(Fails, client=CLIENT).run(MESSAGE, envelope=envelope(name))


def test_json_lines_have_every_field(clean_logging: None) -> None:
    out = io.StringIO()
    _logging.configure("INFO", log_format="json", stream=out, force=True)
    emit_error_in_a_session()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one object per line, the traceback inside
    info, error = (json.loads(line) for line in lines)
    assert info["message"] == "about to fail\\x1b[31m"
    assert info["logger"] == "pymilterkit.filter.Fails" and info["level"] == "INFO"
    assert error["logger"] == "pymilterkit" and error["level"] == "ERROR"
    assert error["message"] == "Fails.on_rcpt raised ValueError; answering TEMPFAIL"
    assert error["queue_id"] == "QIDJ" and error["stage"] == "on_rcpt"
    assert error["client"] == "198.51.100.7" and error["pid"] == PID
    assert error["session_id"] == info["session_id"]
    assert str(error["session_id"]).startswith(f"{PID}-")
    assert "ValueError: bad\\ninput" in error["exception"]
    assert error["time"].endswith("Z")


def test_text_lines_name_the_fields(clean_logging: None) -> None:
    out = io.StringIO()
    _logging.configure("INFO", stream=out, force=True)
    emit_error_in_a_session("QIDT")
    first = out.getvalue().splitlines()[0]
    assert f" pymilterkit.filter.Fails[{PID}] INFO session={PID}-" in first
    assert first.endswith(
        " stage=on_rcpt client=198.51.100.7: about to fail\\x1b[31m"
    )
    assert " queue_id=QIDT " in first
    logging.getLogger("pymilterkit").warning("no session")
    assert out.getvalue().splitlines()[-1].endswith(f"pymilterkit[{PID}] WARNING no session")


def test_other_loggers_records_are_escaped_too(clean_logging: None) -> None:
    out = io.StringIO()
    _logging.configure("INFO", stream=out, force=True)
    logging.getLogger("myfilter").warning("rcpt %s", "<a@b>\r\nFAKE")
    assert out.getvalue().endswith(f"myfilter[{PID}] WARNING rcpt <a@b>\\r\\nFAKE\n")


def test_log_level_sets_only_the_pymilterkit_loggers(clean_logging: None) -> None:
    out = io.StringIO()
    _logging.configure("DEBUG", stream=out, force=True)
    logging.getLogger("pymilterkit").debug("ours")
    logging.getLogger("httpx").info("theirs")
    logging.getLogger("httpx").warning("their warning")
    text = out.getvalue()
    assert "ours" in text and "theirs" not in text and "their warning" in text
    out = io.StringIO()
    _logging.configure("WARNING", root_level="INFO", stream=out, force=True)
    logging.getLogger("pymilterkit").info("ours")
    logging.getLogger("httpx").info("theirs")
    assert "ours" not in out.getvalue() and "theirs" in out.getvalue()


def test_an_application_s_own_logging_set_up_is_left_alone(clean_logging: None) -> None:
    root = logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())
    root.addHandler(mine)
    before = root.handlers[:]
    assert _logging.configure("DEBUG") is None
    assert root.handlers == before


def test_syslog_goes_to_dev_log_with_the_mail_facility(
    clean_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = str(tmp_path / "log")
    monkeypatch.setattr(_logging, "SYSLOG_ADDRESS", address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(10)
        _logging.configure("INFO", syslog=True, force=True)
        logging.getLogger("pymilterkit").error("disk\nfull")
        datagram = server.recv(65536)
        _logging.configure("INFO", syslog=True, log_format="json", force=True)
        emit_error_in_a_session("QIDS")
        first = server.recv(65536)
    # <19>: facility mail (2) * 8 + severity error (3)
    assert datagram == f"<19>pymilterkit[{PID}]: ERROR disk\\nfull\x00".encode()
    prefix = f"<22>pymilterkit[{PID}]: ".encode()  # mail.info
    assert first.startswith(prefix)
    assert json.loads(first[len(prefix):].rstrip(b"\x00"))["queue_id"] == "QIDS"


def test_syslog_without_dev_log_is_a_configuration_error(
    clean_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_logging, "SYSLOG_ADDRESS", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="cannot log to"):
        _logging.configure("INFO", syslog=True, force=True)
