"""The public surface: what API.md promises is exported, documented and typed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pymilterkit
from pymilterkit import MilterSession

API_MD = Path(__file__).resolve().parents[3] / "shared" / "design" / "API.md"

PROMISED = {
    "MilterSession", "Milter", "run", "Status", "Actions", "ProtocolOpts", "Stage",
    "EsmtpParams", "InetAddress", "UnixAddress", "noreply", "MilterError", "shutdown",
    "libmilter_version", "set_debug_level",
}
STAGES = {
    "on_negotiate", "on_connect", "on_helo", "on_mail", "on_rcpt", "on_data", "on_unknown",
    "on_header", "on_eoh", "on_body", "on_eom", "on_abort", "on_close",
}
SESSION_API = {
    "macro", "set_reply", "add_header", "insert_header", "change_header", "change_sender",
    "add_recipient", "remove_recipient", "replace_body", "progress", "quarantine",
}


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(pymilterkit) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if inspect.ismodule(getattr(pymilterkit, n))}
    assert set(pymilterkit.__all__) - {"__version__"} == public - modules
    assert set(pymilterkit.__all__) >= PROMISED


def test_every_public_name_has_a_docstring() -> None:
    for name in pymilterkit.__all__:
        obj = getattr(pymilterkit, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
    for name in STAGES | SESSION_API:
        assert inspect.getdoc(getattr(MilterSession, name)), f"MilterSession.{name}"


def test_session_methods_exist_with_the_contract_signatures() -> None:
    assert set(dir(MilterSession)) >= STAGES | SESSION_API
    sig = inspect.signature(MilterSession.set_reply)
    assert list(sig.parameters) == ["self", "code", "xcode", "lines"]
    assert str(inspect.signature(MilterSession.change_header)) == (
        "(self, name: 'str | bytes', value: 'str | bytes | None', index: 'int' = 1) -> 'None'"
    )
    assert list(inspect.signature(pymilterkit.Milter).parameters)[:2] == [
        "session_class", "socket"
    ]
    defaults = {
        k: p.default for k, p in inspect.signature(pymilterkit.Milter).parameters.items()
    }
    assert defaults["name"] is None and defaults["timeout"] is None
    assert defaults["backlog"] is None and defaults["debug_level"] == 0
    assert defaults["error_status"] is pymilterkit.Status.TEMPFAIL
    assert defaults["workers"] == 1


def test_api_md_names_are_all_exported() -> None:
    if not API_MD.exists():  # the design folder sits beside the checkout
        return
    text = API_MD.read_text()
    table_names = set(re.findall(r"^\| `([A-Za-z_]+)`", text, re.MULTILINE))
    top_level = {n for n in table_names if not n.startswith(("on_", "macro"))} - SESSION_API
    top_level -= {"actions", "protocol", "requested_macros"}
    assert top_level <= set(pymilterkit.__all__), top_level - set(pymilterkit.__all__)


def test_status_values_are_libmilters() -> None:
    s = pymilterkit.Status
    assert [s.CONTINUE, s.REJECT, s.DISCARD, s.ACCEPT, s.TEMPFAIL, s.NOREPLY, s.SKIP] == [
        0, 1, 2, 3, 4, 7, 8
    ]
    st = pymilterkit.Stage
    assert list(
        range(7)
    ) == [st.CONNECT, st.HELO, st.ENVFROM, st.ENVRCPT, st.DATA, st.EOM, st.EOH]
