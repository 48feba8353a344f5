"""Handing the runner an instance instead of the class, or a class that is not a session."""

from pymilterkit import Milter, MilterSession, Status, run


class Plain:
    def on_eom(self) -> Status:
        return Status.CONTINUE


class Fine(MilterSession):
    pass


Milter(Fine(), "inet:3000@localhost")  # E: arg-type
Milter(Plain, "inet:3000@localhost")  # E: arg-type
Milter(Fine, "inet:3000@localhost", timeout="30")  # E: arg-type
Milter(Fine, "inet:3000@localhost", error_status=4)  # E: arg-type
Milter(Fine, "inet:3000@localhost", error_status=Status.SKIP)  # E: arg-type
run(Fine, "inet:3000@localhost", workerz=2)  # E: call-arg
run(Fine, "inet:3000@localhost", timeout="30")  # E: arg-type
