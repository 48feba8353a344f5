"""Whole-message filters for the end-to-end content tests (`test_postfix_content.py`).

`CorpusEditor` edits headers and bodies in varied ways and writes, per message (named by its
first recipient's local part), what it got (`NAME.orig`: `message.open()`) and what it left
(`NAME.edited`: `message.email` as bytes) into `$PMK_CORPUS_DIR`.
"""

from __future__ import annotations

import email.policy
import os
from pathlib import Path

from typing_extensions import override

from examples.attachments import remove_executables
from examples.footer import add_footer, text_parts
from pymilterkit import Actions, Message, MilterSession, Status

CRLF = email.policy.default.clone(linesep="\r\n")


class CorpusEditor(MilterSession):
    actions = Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_BODY
    max_message_size = 64 * 1024 * 1024

    @override
    def on_message(self, message: Message) -> Status:
        name = message.recipients[0].strip("<>").split("@")[0]
        mail = message.email
        del mail["X-Spam-Flag"]
        if "Subject" in mail:
            mail.replace_header("Subject", "[checked] " + str(mail["Subject"]))
        if "X-Dup" in mail:
            values = mail.get_all("X-Dup") or []
            del mail["X-Dup"]
            for value in values[::2]:  # every other one stays
                mail["X-Dup"] = value
        mail["X-Checked"] = f"{len(message.headers)} headers, {message.size} bytes"
        if name == "plain":  # an insert below the top: the MTA counts its own Received: first
            headers: list[tuple[str, str]] = vars(mail)["_headers"]  # no public insert
            headers.insert(1, mail.policy.header_store_parse("X-Second", "inserted"))
        if name not in ("big", "nobody", "noheaders"):
            remove_executables(mail)
            for part in list(text_parts(mail)):
                add_footer(part, "-- \nchecked\n", is_root=part is mail)
        out = Path(os.environ["PMK_CORPUS_DIR"])
        with message.open() as raw:
            (out / f"{name}.orig").write_bytes(raw.read())
        (out / f"{name}.edited").write_bytes(mail.as_bytes(policy=CRLF))
        return Status.CONTINUE
