"""The whole message of a whole-message filter: exact bytes, spooling, size limit, edits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from pymilterkit._flags import Status
from pymilterkit._message import Message, MessageBuffer
from pymilterkit.testing._apply import apply_modifications
from pymilterkit.testing._results import (
    BodyReplaced,
    MessageResult,
    Modification,
    Step,
)

from .test_edits import _modifications

PLAIN = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and a long subject that is folded\r\n"
    b"  onto a second line\r\n"
    b"Received: from a\r\n"
    b"Received:from b\r\n"
    b"\r\n"
    b"Hello\r\n\r\nthere\r\n"
)
MULTIPART = (
    b"From: a@example.net\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="x.exe"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n"
    b"--b1--\r\n"
)
NO_BODY = b"Subject: empty\r\n\r\n"


_open: list[MessageBuffer] = []


@pytest.fixture(autouse=True)
def _close_buffers() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def _collect(raw: bytes, **kwargs: int | str | None) -> MessageBuffer:
    """Feed a message to a buffer the way the stages do (HDR_LEADSPC: value after the colon)."""
    buffer = MessageBuffer(**kwargs)  # type: ignore[arg-type]
    _open.append(buffer)
    if raw.startswith(b"\r\n"):  # no header at all
        head, body = b"", raw[2:]
    else:
        head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[str] = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += "\n" + line
        elif line:
            fields.append(line)
    for field in fields:
        name, value = field.split(":", 1)
        buffer.header(name, value)
    buffer.end_of_headers()
    for start in range(0, len(body), 7000):
        buffer.body(body[start : start + 7000])
    return buffer


def _message(raw: bytes, **kwargs: int | str | None) -> Message:
    return Message(_collect(raw, **kwargs), "<a@example.net>", ["<b@example.org>"], "Q1")


def _deliver(raw: bytes, message: Message) -> bytes:
    """What the MTA delivers after the message's edits (the harness's rules)."""
    headers, body = message.edits()
    mods: list[Modification] = list(_modifications(headers))
    if body is not None:
        mods.append(BodyReplaced(body))
    result = MessageResult(Status.CONTINUE, Step.EOM, None, tuple(mods), (), ())
    return apply_modifications(raw, result, leading_space=True)


@pytest.mark.parametrize("raw", [PLAIN, MULTIPART, NO_BODY])
def test_open_gives_the_bytes_as_the_mta_has_them(raw: bytes) -> None:
    message = _message(raw)
    with message.open() as reader:
        assert reader.read() == raw
    assert message.size == len(raw)
    assert message.headers[3] == ("Received", " from a") if raw is PLAIN else True


@pytest.mark.parametrize("raw", [PLAIN, MULTIPART, NO_BODY])
def test_reading_the_email_without_editing_it_changes_nothing(raw: bytes) -> None:
    message = _message(raw)
    assert message.email.keys() == [n for n, _ in message.headers]
    assert message.edits() == ([], None)


def test_past_the_threshold_the_message_is_in_an_unnamed_file(tmp_path: Path) -> None:
    raw = PLAIN + b"x" * 5000 + b"\r\n"
    buffer = _collect(raw, threshold=1024, directory=str(tmp_path))
    assert buffer.on_disk
    assert list(tmp_path.iterdir()) == []  # no name: nothing to clean up after a crash
    message = Message(buffer, "", [], None)
    with message.open() as one, message.open() as two:  # readers with positions of their own
        assert one.read(10) == raw[:10]
        assert two.read() == raw
    fd = buffer._spool.fileno()
    buffer.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_spooled_message_reads_back_whole_with_chunks_still_buffered(tmp_path: Path) -> None:
    # After the roll-over to a file, small chunks sit in the file's buffer until a flush.
    raw = PLAIN + b"x" * 5000 + b"\r\n" + b"tail\r\n" * 10
    buffer = _collect(raw, threshold=1024, directory=str(tmp_path))
    buffer.body(b"last\r\n")
    whole = raw + b"last\r\n"
    message = Message(buffer, "", [], None)
    with message.open() as reader:
        assert reader.read() == whole
    assert message.email.get_content().endswith("tail\r\nlast\r\n")  # as parsebytes reads it
    assert buffer.body_bytes().endswith(b"tail\r\nlast\r\n")


def test_a_message_past_max_size_is_not_kept() -> None:
    buffer = _collect(PLAIN + b"y" * 10_000, max_size=4096)
    assert buffer.too_big
    assert buffer.size <= 4096


def test_header_edits_reach_the_delivered_message() -> None:
    message = _message(PLAIN)
    mail = message.email
    del mail["Received"]
    mail["X-Scanned"] = "yes"
    mail.replace_header("Subject", "caf\u00e9 tout court")
    delivered = _deliver(PLAIN, message)
    text = delivered.decode()
    assert "Received" not in text
    assert text.endswith("\r\n\r\nHello\r\n\r\nthere\r\n")  # body untouched
    assert "X-Scanned: yes\r\n" in text
    assert "Subject: =?utf-8?q?caf=C3=A9?= tout court\r\n" in text
    assert message.edits()[1] is None


def test_a_body_edit_replaces_the_body_and_its_headers_follow() -> None:
    message = _message(MULTIPART)
    mail = message.email
    for part in list(mail.iter_attachments()):
        if part.get_filename() == "x.exe":
            mail.get_payload().remove(part)  # type: ignore[union-attr]
    _, body = message.edits()
    assert body is not None and b"x.exe" not in body and "caf\u00e9".encode() in body
    delivered = _deliver(MULTIPART, message)
    from email import policy
    from email.parser import BytesParser

    again = BytesParser(policy=policy.default).parsebytes(delivered)
    assert isinstance(again, EmailMessage)
    assert [p.get_content_type() for p in again.walk()] == ["multipart/mixed", "text/plain"]


def test_a_short_plain_header_value_goes_out_as_the_policy_would_fold_it() -> None:
    # `_wire` skips the policy for short unstructured ASCII values; the result must not differ.
    import random
    import string
    from email import policy

    from pymilterkit._message import _WIRE, _wire

    names = ["X-Parts", "Subject", "Comments", "X-A", "List-Id", "Received", "To", "Date",
             "Content-Type", "X-" + "Long" * 12]
    alphabet = string.ascii_letters + string.digits + " ;:,.<>@()\"'=?!#%&*+-/[]\\^_`{|}~\t"
    rng = random.Random(7)
    fast = 0
    for i in range(20_000):
        name = rng.choice(names)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        if i % 3 == 0:
            text = text.replace(" ", "  ")
        value: object = text
        if i % 2:
            try:  # as raw_items gives it after `message[name] = text`
                value = policy.default.header_store_parse(name, text)[1]
            except Exception:  # noqa: BLE001 - the policy refuses to store it at all
                continue
        try:
            folded = _WIRE.fold(name, value)[len(name) + 1 :].rstrip("\n")  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the policy refuses to fold it: so does ours
            with pytest.raises(type(exc)):
                _wire(name, value)
            continue
        assert _wire(name, value) == folded, (name, text)
        fast += folded == " " + str(value)
    assert fast > 5_000  # the short path was taken often


def test_the_parsing_policy_makes_each_header_class_once_and_parses_as_the_default() -> None:
    from email import policy
    from email.parser import BytesParser

    from pymilterkit._message import _PARSE

    factory = _PARSE.header_factory
    assert factory("X-A", "1").__class__ is factory("X-B", "2").__class__
    assert factory("To", "a@example.net").__class__ is factory("cc", "b@example.net").__class__
    assert factory("To", "a@example.net").__class__ is not factory("X-A", "1").__class__
    for raw in (PLAIN, MULTIPART):
        ours = BytesParser(policy=_PARSE).parsebytes(raw)
        standard = BytesParser(policy=policy.default).parsebytes(raw)
        assert ours.as_bytes() == standard.as_bytes()
        for (name, value), (_, expected) in zip(ours.items(), standard.items(), strict=True):
            assert (str(value), type(value).__mro__[1:]) == (
                str(expected), type(expected).__mro__[1:]), name


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN,
        MULTIPART,
        NO_BODY,
        b"\r\nno header at all\r\n",
        b"Subject: lone CR\r\n\r\nA\rB\r\n\xff\xfe 8-bit\r\n" + b"z" * 5000 + b"\r\n",
        b"Bad Name: a header the parser takes for the body\r\nTo: b@example.org\r\n\r\nbody\r\n",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "caf\u00e9\r\n".encode() * 2000,
        b'Content-Type: (a comment) multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\np\r\n--b--\r\n',
        b"CONTENT-TYPE:  MULTIPART/Mixed; boundary=b\r\n\r\n--b\r\n\r\np\r\n--b--\r\n",
        b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n",
        b"Content-Type: message/\r\n\r\nbody\r\n",
    ],
)
@pytest.mark.parametrize("threshold", [1 << 20, 1024])
def test_email_is_what_parsebytes_makes_of_the_bytes_in_memory_or_on_disk(
    raw: bytes, threshold: int
) -> None:
    # A leaf message's body is set without the parser's line-by-line pass; others are parsed
    # whole. Either way, and from memory or from the file, the result is parsebytes's.
    from email.parser import BytesParser

    from pymilterkit._message import _PARSE

    message = _message(raw, threshold=threshold)
    buffer = message._buffer
    with message.open() as reader:
        exact = reader.read()
    assert buffer.on_disk == (len(exact) > threshold)
    ours, expected = message.email, BytesParser(policy=_PARSE).parsebytes(exact)
    assert ours.as_bytes() == expected.as_bytes()
    assert [type(d) for d in ours.defects] == [type(d) for d in expected.defects]
    pairs = list(zip(ours.walk(), expected.walk(), strict=True))
    for mine, theirs in pairs:
        assert mine.items() == theirs.items()
        if not mine.is_multipart():
            assert mine.get_payload() == theirs.get_payload()


_LEAF = (
    b"From: a@example.net\r\nSubject: a leaf past the threshold\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + b"line of the body\r\n" * 400
)


def _edit(mail: EmailMessage, how: str) -> object:
    """One way of reading or editing a message (each goes through `_payload` its own way)."""
    if how == "content":
        return mail.get_content()
    if how == "decoded":
        return mail.get_payload(decode=True)
    if how == "set_content":
        mail.set_content("new text\n")
    elif how == "attachment":  # _make_multipart moves the body into a part of its own
        mail.add_attachment(b"\x00data", maintype="application", subtype="octet-stream",
                            filename="a.bin")
    elif how == "mixed":
        mail.make_mixed()
    elif how == "charset":  # set_charset re-encodes `_payload` in place
        mail.set_payload("caf\u00e9\n")
        mail.set_charset("utf-8")
    elif how == "clear":
        mail.clear_content()
    elif how == "header":
        mail["X-Parts"] = str(sum(1 for _ in mail.walk()))
    return None


@pytest.mark.parametrize(
    "how", ["header", "content", "decoded", "set_content", "attachment", "mixed", "charset",
            "clear"]
)
def test_a_spooled_leafs_body_is_read_when_used_and_edits_as_a_whole_parse(how: str) -> None:
    # Foreign internals (`_message._Leaf`): email.message reads and writes `_payload` directly.
    from email.parser import BytesParser

    from pymilterkit._message import _PARSE

    message = _message(_LEAF, threshold=1024)
    mail, whole = message.email, BytesParser(policy=_PARSE).parsebytes(_LEAF)
    assert message._buffer.on_disk and mail.__dict__["_pmk_read"] is not None  # not read yet
    assert _edit(mail, how) == _edit(whole, how)
    expected = whole.as_bytes()  # a new multipart's boundary is drawn when first written
    if whole.get_boundary() is not None:
        mail.set_boundary(whole.get_boundary())  # type: ignore[arg-type]
    _, body = message.edits()
    if how == "header":  # walked and a header added: the body was never read
        assert mail.__dict__["_pmk_read"] is not None
    if how in ("header", "content", "decoded"):  # read, not changed: no body to send
        assert body is None
    assert mail.as_bytes() == expected
    assert [p.get_content_type() for p in mail.walk()] == [
        p.get_content_type() for p in whole.walk()]
    delivered = BytesParser(policy=_PARSE).parsebytes(_deliver(_LEAF, message))
    assert delivered.as_bytes() == expected


def test_a_spooled_leaf_copies_and_pickles_with_its_body() -> None:
    import copy
    import pickle
    from email.parser import BytesParser

    from pymilterkit._message import _PARSE

    def pickled(mail: EmailMessage) -> EmailMessage:
        twin: EmailMessage = pickle.loads(pickle.dumps(mail))
        return twin

    # A spooled leaf (read now, not later) and any parsed message (its policy's header
    # classes are made at run time), with a header added, as a filter may hand them on.
    for raw, threshold in ((_LEAF, 1024), (PLAIN, 1 << 20), (MULTIPART, 1024)):
        expected = BytesParser(policy=_PARSE).parsebytes(raw)
        expected["X-Added"] = "1"
        makers: tuple[Callable[[EmailMessage], EmailMessage], ...] = (
            copy.deepcopy, copy.copy, pickled)
        for make in makers:
            mail = _message(raw, threshold=threshold).email
            mail["X-Added"] = "1"
            twin = make(mail)
            assert twin.as_bytes() == expected.as_bytes() == mail.as_bytes()

