"""`actions` given as a string (or a bare int) instead of Actions flags."""

from pymilterkit import MilterSession, ProtocolOpts


class ActionsStr(MilterSession):
    actions = "ADD_HEADER"  # E: assignment


class ActionsInt(MilterSession):
    actions = 1  # E: assignment


class ProtocolFromActions(MilterSession):
    protocol = ProtocolOpts.SKIP
    actions = ProtocolOpts.HDR_LEADSPC  # E: assignment
