"""The running event loop, looked up once per object.

On CPython 3.11, ``asyncio.get_running_loop()`` calls ``getpid()`` every time (to notice that
the process forked), and so does everything that looks the loop up itself:
``asyncio.current_task()``, ``asyncio.create_task()``, a ``Future`` made without its loop. On
this project's virtual machines that system call was 10 % of the worker's CPU under ``llmstream
bench`` (``py-spy record --native``). Objects on the per-request path keep the loop they first
ran on instead; each belongs to one event loop, as asyncio's own objects do.
"""

from __future__ import annotations

import asyncio

__all__ = ["BoundLoop"]


class BoundLoop:
    """The event loop its owner first ran on: ``get()`` it rather than asking asyncio."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def current_task(self) -> asyncio.Task[object] | None:
        """``asyncio.current_task()`` without looking the loop up."""
        return asyncio.current_task(self.get())
