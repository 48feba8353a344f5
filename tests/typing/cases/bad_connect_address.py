"""on_connect assuming the address is always an InetAddress (it may be UnixAddress or None)."""

from typing_extensions import override

from pymilterkit import InetAddress, MilterSession, Status


class ConnectInetOnly(MilterSession):
    @override
    def on_connect(self, hostname: str, address: InetAddress) -> Status:  # E: override
        return Status.CONTINUE


class ConnectUsesIp(MilterSession):
    @override
    def on_connect(self, hostname: str, address: InetAddress | None) -> Status:  # E: override
        return Status.CONTINUE
