"""Statuses, action flags, protocol options and macro stages.

Every value equals libmilter's constant of the same meaning (SMFIS_*, SMFIF_*, SMFIP_*, SMFIM_*),
so they go to C unchanged. Nothing here needs libmilter.
"""

from __future__ import annotations

import enum

__all__ = ["Actions", "ProtocolOpts", "Stage", "Status"]


class Status(enum.IntEnum):
    """The answer of a stage method to the MTA (libmilter: SMFIS_*)."""

    CONTINUE = 0
    """Go on with the next stage."""
    REJECT = 1
    """Reject: the connection at connect/HELO, the recipient at RCPT, else the message."""
    DISCARD = 2
    """Accept the message but throw it away (silently)."""
    ACCEPT = 3
    """Accept the message (or connection) without calling this filter again for it."""
    TEMPFAIL = 4
    """Answer with a temporary failure (4xx): the client will retry later."""
    NOREPLY = 7
    """No answer at all; only for stages negotiated as no-reply (see `noreply`)."""
    SKIP = 8
    """Stop sending body chunks and go to end-of-message (needs `ProtocolOpts.SKIP`)."""

    def __str__(self) -> str:
        """The name (`TEMPFAIL`), so a printed or logged verdict reads as one."""
        return self.name


class Actions(enum.IntFlag):
    """What a filter may change in a message (libmilter: SMFIF_*)."""

    NONE = 0
    ADD_HEADER = 0x1
    """Add or insert headers (smfi_addheader, smfi_insheader)."""
    CHANGE_BODY = 0x2
    """Replace the body (smfi_replacebody)."""
    ADD_RCPT = 0x4
    """Add recipients (smfi_addrcpt)."""
    DELETE_RCPT = 0x8
    """Remove recipients (smfi_delrcpt)."""
    CHANGE_HEADER = 0x10
    """Change or delete headers (smfi_chgheader)."""
    QUARANTINE = 0x20
    """Quarantine the message (smfi_quarantine)."""
    CHANGE_FROM = 0x40
    """Change the envelope sender (smfi_chgfrom)."""
    ADD_RCPT_PAR = 0x80
    """Add recipients with ESMTP parameters (smfi_addrcpt_par)."""
    SETSYMLIST = 0x100
    """Ask the MTA for specific macros per stage (smfi_setsymlist)."""


class ProtocolOpts(enum.IntFlag):
    """Protocol options negotiated with the MTA (libmilter: SMFIP_*)."""

    NONE = 0
    NO_CONNECT = 0x1
    NO_HELO = 0x2
    NO_MAIL = 0x4
    NO_RCPT = 0x8
    NO_BODY = 0x10
    NO_HDRS = 0x20
    NO_EOH = 0x40
    NR_HDR = 0x80
    NO_UNKNOWN = 0x100
    NO_DATA = 0x200
    SKIP = 0x400
    """The MTA understands `Status.SKIP`."""
    RCPT_REJ = 0x800
    """Also send recipients the MTA itself rejected (macro {rcpt_mailer} is "error")."""
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    """Header values keep their leading space, both ways."""
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


class Stage(enum.IntEnum):
    """Where requested macros are sent (libmilter: SMFIM_*; EOM comes before EOH)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6

