"""The runner checked by a client nobody here wrote: Debian's miltertest (opendkim)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pymilterkit.testing import MilterProcess

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def run_lua(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "test.lua"
    path.write_text(script)
    miltertest = shutil.which("miltertest")
    assert miltertest, "miltertest is not installed (apt-get install miltertest)"
    return subprocess.run(
        [miltertest, "-s", str(path)], capture_output=True, text=True, timeout=60
    )


def test_rcpt_count_with_miltertest(tmp_path: Path) -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        result = run_lua(
            f"""
            conn = mt.connect("{milter.socket}", 20, 0.1)
            assert(conn, "no connection")
            -- the filter negotiated HELO away: miltertest refuses to send it
            assert(mt.test_option(conn, SMFIP_NOHELO), "helo not negotiated away")
            assert(mt.test_option(conn, SMFIP_NOCONNECT), "connect not negotiated away")
            assert(not mt.test_option(conn, SMFIP_NORCPT), "rcpt negotiated away")
            assert(mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS not requested")
            assert(not mt.test_action(conn, SMFIF_CHGHDRS), "CHGHDRS requested")
            for n = 1, 3 do
              assert(mt.mailfrom(conn, "<a@example.org>") == nil)
              assert(mt.getreply(conn) == SMFIR_CONTINUE)
              for r = 1, n do
                assert(mt.rcptto(conn, "<r" .. r .. "@example.com>") == nil)
                assert(mt.getreply(conn) == SMFIR_CONTINUE)
              end
              assert(mt.eom(conn) == nil)
              assert(mt.getreply(conn) == SMFIR_CONTINUE)
              if not mt.eom_check(conn, MT_HDRADD, "X-Rcpt-Count", tostring(n)) then
                print("wrong header for " .. n); error("wrong header")
              end
              assert(mt.abort(conn) == nil)
            end
            mt.disconnect(conn)
            print("all good")
            """,
            tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr + milter.log()
        assert "all good" in result.stdout


def test_every_action_with_miltertest(tmp_path: Path) -> None:
    with MilterProcess("tests.integration.filters:EveryActionSmallBody", cwd=ROOT) as milter:
        result = run_lua(
            f"""
            conn = mt.connect("{milter.socket}", 20, 0.1)
            assert(conn, "no connection")
            assert(mt.eom(conn) == nil)
            assert(mt.getreply(conn) == SMFIR_CONTINUE)
            -- miltertest does not decode ADDRCPT_PAR ('2') packets and keeps only the last
            -- body replacement chunk: both are checked in full by pymilterkit's own client.
            local checks = {{
              {{MT_HDRADD, "X-Added", "one"}},
              {{MT_HDRINSERT, "X-Inserted", "at the top"}},
              {{MT_HDRCHANGE, "Subject", "changed subject"}},
              {{MT_HDRDELETE, "X-Remove-Me"}},
              {{MT_RCPTADD, "<added@example.org>"}},
              {{MT_RCPTDELETE, "<rcpt@example.org>"}},
              {{MT_BODYCHANGE, "appended\\r\\n"}},
              {{MT_QUARANTINE, "held for review"}},
            }}
            for i, c in ipairs(checks) do
              if not mt.eom_check(conn, table.unpack(c)) then
                print("check " .. i .. " failed"); error("check failed")
              end
            end
            mt.disconnect(conn)
            print("all good")
            """,
            tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr + milter.log()
        assert "all good" in result.stdout
