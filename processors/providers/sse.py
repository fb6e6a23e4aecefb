"""Server-Sent Events, decoded incrementally from whatever bytes each socket read brings.

Both streaming APIs answer ``text/event-stream`` (the WHATWG "event stream interpretation"):
lines end in CR, LF or CRLF; ``field: value`` lines build an event; an empty line dispatches it;
several ``data`` lines are joined with ``\\n``; a line starting with ``:`` is a comment
(keep-alives); ``id`` and ``retry`` are read and ignored (a provider call is never resumed). A
read may end anywhere: inside a line, inside a UTF-8 sequence, or between the CR and LF of one
line ending, so bytes are kept until their line is complete. Lines have no length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent"]

_CR = 13
_LF = 10


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event: its ``event`` name (``""`` when it had none) and its data."""

    event: str
    data: str


class SSEDecoder:
    """Feed it the body's bytes in any pieces; it returns each event once its empty line came."""

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of a line whose end has not arrived
        self._skip_lf = False  # the last piece ended in CR: an LF starting the next one is its end
        self._event = ""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[ServerSentEvent]:
        """The events completed by ``piece``, in order."""
        if self._skip_lf and piece[:1] == b"\n":
            piece = piece[1:]
        self._skip_lf = False
        if not piece:
            return []
        if b"\n" not in piece and b"\r" not in piece:
            self._partial += piece  # no line ends here: nothing to scan twice
            return []
        if self._partial:
            self._partial += piece
            lines = self._partial.splitlines(keepends=True)
        else:
            lines = bytearray(piece).splitlines(keepends=True)
        last = lines[-1]
        if last[-1] not in (_CR, _LF):
            self._partial = lines.pop()
        else:
            self._partial = bytearray()
            self._skip_lf = last[-1] == _CR
        events: list[ServerSentEvent] = []
        for raw in lines:
            event = self._line(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:  # no data: nothing is dispatched, and the event name resets
                self._event = ""
                return None
            event = ServerSentEvent(self._event, "\n".join(self._data))
            self._event = ""
            self._data = []
            return event
        if line[0] == ":":
            return None  # a comment: keep-alive pings
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
