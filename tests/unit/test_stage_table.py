"""The one stage table (`pymilterkit._protocol.STAGES`) agrees with everything named after it."""

from __future__ import annotations

from pymilterkit import MilterSession, ProtocolOpts, _metrics
from pymilterkit._libmilter import Libmilter, SmfiDesc
from pymilterkit._protocol import (
    ACTION,
    ACTIONS,
    BY_METHOD,
    NO_STAGE_MASK,
    NOREPLY_MASK,
    STAGES,
    ActionBackend,
)
from pymilterkit._session import OTHER_STAGES, STAGE_FLAGS
from pymilterkit.testing import Step
from pymilterkit.testing import _engine as engine
from pymilterkit.testing import _wire as w
from pymilterkit.testing._envelope import MACRO_STAGES


def test_every_stage_method_is_described_once() -> None:
    hooks = {"on_worker_start", "on_worker_stop"}  # per process, not per connection
    methods = {name for name in vars(MilterSession) if name.startswith("on_")} - hooks
    described = [info.method for info in STAGES]
    assert len(described) == len(set(described))
    assert set(described) | {"on_abort", "on_close", "on_negotiate", "on_message"} == methods
    assert set(STAGE_FLAGS) | set(OTHER_STAGES) == methods


def test_flags_commands_and_callbacks_are_distinct_and_real() -> None:
    offs = [info.off for info in STAGES if info.off]
    nrs = [info.noreply for info in STAGES if info.noreply]
    assert len(set(offs)) == len(offs) and len(set(nrs)) == len(nrs)
    assert ProtocolOpts(sum(offs)) == NO_STAGE_MASK
    assert all(nr & NOREPLY_MASK for nr in nrs)
    commands = [info.command for info in STAGES]
    assert len(set(commands)) == len(commands)
    fields = {field[0] for field in SmfiDesc._fields_}
    assert {info.callback for info in STAGES} <= fields


def test_derived_tables_follow_the_table() -> None:
    assert STAGE_FLAGS["on_header"] == (ProtocolOpts.NO_HDRS, ProtocolOpts.NR_HDR)
    assert {Step(info.step) for info in STAGES} <= set(Step)
    assert w.RCPT == BY_METHOD["on_rcpt"].command == b"R"
    assert w.BODYEOB == b"E" and w.HEADER == b"L"
    assert MACRO_STAGES[Step.MAIL] == BY_METHOD["on_mail"].macros
    assert Step.HEADER not in MACRO_STAGES


def test_every_backend_method_is_one_row_of_the_action_table() -> None:
    methods = {name for name in vars(ActionBackend) if not name.startswith("_")}
    assert methods - {"act", "getsymval"} == {info.method for info in ACTIONS} == set(ACTION)
    assert all(hasattr(Libmilter, info.function) for info in ACTIONS)
    assert set(_metrics.ACTIONS) == {info.label for info in ACTIONS}
    commands = {info.command for info in ACTIONS}
    assert commands <= {v for n, v in vars(w).items() if n.isupper() and isinstance(v, bytes)}


def test_the_engine_states_of_the_table_are_libmilters() -> None:
    names = {"on_connect": "CONN", "on_helo": "HELO", "on_mail": "MAIL", "on_rcpt": "RCPT",
             "on_data": "DATA", "on_unknown": "UNKN", "on_header": "HDRS", "on_eoh": "EOHS",
             "on_body": "BODY", "on_eom": "ENDM"}
    assert {info.method: info.state for info in STAGES} == {
        method: getattr(engine, f"ST_{name}") for method, name in names.items()
    }
