"""The one error type every protocol decoder raises."""


class ProtocolError(Exception):
    """A message, chunk or delta was rejected.

    `reason` is a short stable token (e.g. "truncated", "bad-signature", "replay") that callers may count or log;
    the message text is for humans. A decoder that raises this has changed no state.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
