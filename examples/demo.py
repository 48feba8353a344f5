"""The README's first command: the recipient counter on a real libmilter, no mail server needed.

Starts `examples/rcpt_count.py:RcptCount` with `pymilterkit run` on a unix socket in a
temporary directory, drives one sample message through it with pymilterkit's MTA-side client
(as Postfix would), and prints what the filter did and the message as it would be delivered.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pymilterkit.testing import MilterClient, MilterProcess, apply_modifications  # noqa: E402

SAMPLE = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: Bob <bob@example.org>, Carol <carol@example.org>\r\n"
    b"Cc: Dave <dave@example.org>\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"\r\n"
    b"Hi all, shall we meet at noon?\r\n"
)
RECIPIENTS = ["bob@example.org", "carol@example.org", "dave@example.org"]


def main() -> int:
    """Run the demo; returns the exit status."""
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        print(f"milter running: pymilterkit run examples.rcpt_count:RcptCount "
              f"--socket {milter.socket}  (pid {milter.pid})")
        client = MilterClient(milter.socket, timeout=10)
        result = client.run(SAMPLE, sender="alice@example.net", recipients=RECIPIENTS)
    print(f"sent 1 message with {len(RECIPIENTS)} recipients; verdict: {result.status.name} "
          f"at {result.stage}")
    for modification in result.modifications:
        print(f"  the filter did: {modification}")
    added = result.header("X-Rcpt-Count")
    print(f"\nadded header ->  X-Rcpt-Count: {added}\n")
    print("the message as the MTA would deliver it:")
    print(apply_modifications(SAMPLE, result).decode("utf-8", "replace").replace("\r\n", "\n"))
    return 0 if added == str(len(RECIPIENTS)) else 1


if __name__ == "__main__":
    sys.exit(main())
