"""examples/policy.py: multi-line rejections at connect and HELO."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from examples.policy import ConnectionPolicy
from pymilterkit import Actions, InetAddress, Status, UnixAddress
from pymilterkit.testing import ClientInfo, Reply, Step
from pymilterkit.testing.pytest_plugin import HarnessFactory

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
GOOD = InetAddress(ip_address("198.51.100.7"), 40000)
CONTACT = "Contact postmaster@example.com if this is a mistake."


def client(helo: str | None = "mail.example.net", address: InetAddress | UnixAddress = GOOD,
           hostname: str = "mail.example.net", mta: str = "mx.example.org") -> ClientInfo:
    return ClientInfo(hostname=hostname, address=address, helo=helo,
                      macros={"connect": {"j": mta}})


def test_good_client_passes(milter_harness: HarnessFactory) -> None:
    result = milter_harness(ConnectionPolicy).run(MESSAGE, client=client())
    assert result.status is Status.CONTINUE
    assert result.stage is Step.EOM


def test_blocked_network_is_rejected_at_connect(milter_harness: HarnessFactory) -> None:
    bad = InetAddress(ip_address("203.0.113.9"), 40000)
    result = milter_harness(ConnectionPolicy).run(MESSAGE, client=client(address=bad))
    assert (result.status, result.stage) == (Status.REJECT, Step.CONNECT)
    assert result.reply == Reply("550", "5.7.1", (
        "Connections from 203.0.113.9 are not accepted here.",
        "This network is blocked by local policy.",
        CONTACT,
    ))


def test_dynamic_hostname_is_rejected_at_connect(milter_harness: HarnessFactory) -> None:
    result = milter_harness(ConnectionPolicy).run(
        MESSAGE, client=client(hostname="dsl-84-1-2-3.dynamic.example.net"))
    assert (result.status, result.stage) == (Status.REJECT, Step.CONNECT)
    assert result.reply is not None
    assert result.reply.lines[0] == (
        "Host name dsl-84-1-2-3.dynamic.example.net looks like a dynamic address.")


def test_trusted_network_is_accepted_without_helo_checks(milter_harness: HarnessFactory) -> None:
    class Trusting(ConnectionPolicy):
        trusted_networks = (ip_network("198.51.100.0/24"),)

    result = milter_harness(Trusting).run(MESSAGE, client=client(helo="localhost"))
    assert (result.status, result.stage) == (Status.ACCEPT, Step.CONNECT)


@pytest.mark.parametrize(
    ("helo", "problem"),
    [
        ("198.51.100.7", "is an IP address, not a host name"),
        ("[192.0.2.1]", "is an address literal that is not your address"),
        ("[nonsense]", "is not a valid address literal"),
        ("localhost", "is not your host name"),
        ("LOCALHOST.localdomain", "is not your host name"),
        ("myhost", "is not a fully qualified host name"),
        ("MX.example.org.", "is my name, not yours"),
    ],
)
def test_bad_helo_is_rejected(milter_harness: HarnessFactory, helo: str, problem: str) -> None:
    result = milter_harness(ConnectionPolicy).run(MESSAGE, client=client(helo=helo))
    assert (result.status, result.stage) == (Status.REJECT, Step.HELO)
    assert result.reply == Reply("550", "5.7.1", (
        f"HELO {helo} rejected: it {problem}.",
        "Use the fully qualified name of your mail server.",
        CONTACT,
    ))


@pytest.mark.parametrize("helo", ["[198.51.100.7]", "mail.example.net", "a.b"])
def test_good_helo_passes(milter_harness: HarnessFactory, helo: str) -> None:
    result = milter_harness(ConnectionPolicy).run(MESSAGE, client=client(helo=helo))
    assert result.status is Status.CONTINUE


def test_unix_socket_client_is_only_checked_by_helo(milter_harness: HarnessFactory) -> None:
    local = UnixAddress("/run/submission.sock")
    assert milter_harness(ConnectionPolicy).run(
        MESSAGE, client=client(address=local)).status is Status.CONTINUE
    result = milter_harness(ConnectionPolicy).run(
        MESSAGE, client=client(address=local, helo="[192.0.2.1]"))
    assert result.status is Status.CONTINUE  # no client IP to compare the literal with


def test_asks_only_for_connect_and_helo() -> None:
    spec = ConnectionPolicy.negotiation()
    assert spec.stages == {"on_connect", "on_helo"}
    assert spec.actions == Actions.SETSYMLIST  # no message actions, just the macro list
