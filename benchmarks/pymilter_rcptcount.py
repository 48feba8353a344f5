"""The benchmark's "recipient counter" milter written with pymilter.

Same filter as ``c/rcptcount.c``: envfrom resets the count, envrcpt
increments it, eom adds ``X-Rcpt-Count: <n>``; only SMFIF_ADDHDRS is
requested.  Written the idiomatic pymilter way: one ``Milter.Base`` instance
per connection, envfrom/envrcpt decorated with ``@Milter.noreply`` so the MTA
does not wait for them (pymilter negotiates SMFIP_NR_MAIL|SMFIP_NR_RCPT), and
every callback that is not overridden is negotiated away.

Runs in the benchmark's own virtualenv (see ``_env.py``), which has pymilter
from PyPI::

    benchmarks/build/venv/bin/python benchmarks/pymilter_rcptcount.py unix:/tmp/x/m.sock

``--reply`` drops the ``@noreply`` decorators, so envfrom/envrcpt are answered
like in the plain C milter (``rcptcount`` without ``-n``).

libmilter stops the milter on SIGTERM; the process then exits 0.
"""

import argparse
import sys

import Milter


class RcptCount(Milter.Base):
    """Counts the envelope recipients of each message (noreply variant)."""

    def __init__(self):
        self.nrcpt = 0

    @Milter.noreply
    def envfrom(self, mailfrom, *params):
        self.nrcpt = 0
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to, *params):
        self.nrcpt += 1
        return Milter.CONTINUE

    def eom(self):
        self.addheader("X-Rcpt-Count", str(self.nrcpt))
        self.nrcpt = 0
        return Milter.CONTINUE


class RcptCountReply(Milter.Base):
    """Same filter, but envfrom/envrcpt are answered (no @noreply)."""

    def __init__(self):
        self.nrcpt = 0

    def envfrom(self, mailfrom, *params):
        self.nrcpt = 0
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        self.nrcpt += 1
        return Milter.CONTINUE

    def eom(self):
        self.addheader("X-Rcpt-Count", str(self.nrcpt))
        self.nrcpt = 0
        return Milter.CONTINUE


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sockspec", help="libmilter socket spec, e.g. unix:/tmp/x/m.sock")
    ap.add_argument("--reply", action="store_true",
                    help="answer envfrom/envrcpt (no @Milter.noreply)")
    ap.add_argument("--timeout", type=int, default=600,
                    help="MTA read/write timeout in seconds (default 600)")
    args = ap.parse_args(argv)

    Milter.factory = RcptCountReply if args.reply else RcptCount
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("bench", args.sockspec, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
