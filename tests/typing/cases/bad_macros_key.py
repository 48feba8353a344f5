"""requested_macros keyed by a stage name or number instead of a Stage member."""

from pymilterkit import MilterSession, Stage


class MacrosStrKey(MilterSession):
    requested_macros = {"connect": ["j", "{daemon_name}"]}  # E: dict-item


class MacrosIntKey(MilterSession):
    requested_macros = {0: ["j"]}  # E: dict-item


class MacrosIntValue(MilterSession):
    requested_macros = {Stage.ENVRCPT: [1, 2]}  # E: list-item
