"""The public surface of pymilterkit.testing: `__all__` lists exactly the public names."""

from __future__ import annotations

import types

import pymilterkit.testing as testing


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(testing).items()
        if not name.startswith(("_", "@")) and not isinstance(value, types.ModuleType)
    }
    public -= {"annotations"}
    assert set(testing.__all__) == public
    assert sorted(testing.__all__, key=str.lower) == sorted(set(testing.__all__), key=str.lower)


def test_importing_testing_does_not_need_libmilter() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pymilterkit.testing, pymilterkit.testing.pytest_plugin;"
        "from pymilterkit.testing import Harness;"
        "from examples.rcpt_count import RcptCount;"
        "assert Harness(RcptCount).run(b'Subject: x\\r\\n\\r\\n').header('X-Rcpt-Count') == '1';"
        "sys.exit('libmilter' in open('/proc/self/maps').read())"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
