"""Ctrl-C for DuckDB queries run from the main thread.

DuckDB's relation API does not poll Python's signal flag, so a SIGINT would wait for the
query to finish. While a query runs, SIGINT gets a handler that only records it, and
Python's C-level handler writes the signal number to a wakeup socket
(`signal.set_wakeup_fd`); a watcher thread reads it and calls `connection.interrupt()`.
The query then fails with InterruptException, the block ends cleanly (no KeyboardInterrupt
can land half-way through the clean-up), and a Ctrl-C outside the query is re-raised as
KeyboardInterrupt at the end.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

_STOP = 0xFF  # not a signal number: tells the watcher the query is over


@contextlib.contextmanager
def sigint_interrupts(con):
    """Within the block, Ctrl-C interrupts `con`'s running query (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread; nothing to watch
        return
    pressed = threading.Event()
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch():
        while True:
            data = reader.recv(64)
            if signal.SIGINT in data:
                pressed.set()
                con.interrupt()
            if not data or _STOP in data:
                return

    watcher = threading.Thread(target=watch, name="selfrepair-sigint", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous_handler)
        writer.send(bytes([_STOP]))
        watcher.join()
        reader.close()
        writer.close()
    if pressed.is_set():
        raise KeyboardInterrupt
