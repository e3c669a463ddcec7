"""Ctrl-C outside a command's work: one line and an exit at once, never a traceback, never a wait.

A command spends its first seconds importing torch and its last ones printing and exiting. A KeyboardInterrupt
there ends in a traceback, or, inside the interpreter's shutdown, can leave a thread pool's exit hook half done and
the process waiting for a worker forever (or, in its last instants, kill it by the signal, with nothing said). So
a command hands SIGINT to `exit_at_once` before its imports, and ends with `end`, which exits at once once its work
is over: the process then ends where it is, with one line on stderr. While it works, Ctrl-C raises
KeyboardInterrupt as usual (`raises`), and the command saves what it has and says how to go on. Python drops an
exception raised inside a finalizer or a weakref callback (an import's module lock has one): it prints "Exception
ignored", a traceback, and goes on, the press lost. Within `raises` such a press is said nowhere and delivered
again a moment later, where it can be raised; and the press is noted (`pressed`), since a native call may turn the
interrupt into an error of its own.

Standard library only: a command imports this file before torch.
"""

import _thread
import os
import signal
import sys
import threading
from contextlib import contextmanager

INTERRUPTED = 130  # the shell's exit status for a command ended by Ctrl-C (128 + SIGINT)


def exit_at_once(prog: str, code: int = INTERRUPTED, message: str = "interrupted") -> None:
    """From now on, Ctrl-C ends the process at once, `prog: message` on stderr and exit status `code`.

    os._exit skips the interpreter's shutdown, thread pools' exit hooks included: nothing is left to wait for.
    Whatever the command printed before is flushed first (a print the press cut short stays cut)."""

    def handler(signum, frame):
        flush()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the press: rank 0 says it
            os.write(2, f"\n{prog}: {message}\n".encode())
        os._exit(code)

    signal.signal(signal.SIGINT, handler)


def end(prog: str, code: int) -> None:
    """A command's last step: exit with `code` now, its output flushed, without the interpreter's shutdown (its
    results are written and synced; nothing is left to do, and nothing is left to wait for), Ctrl-C included."""
    exit_at_once(prog, code, "interrupted on the way out, after the run had ended")
    flush()
    os._exit(code)


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or a write in progress (a reentrant call)
            pass


PRESSED = threading.Event()  # Ctrl-C was pressed within `raises`
AGAIN_AFTER = 0.05  # seconds: a press Python dropped comes again once the finalizer it hit has returned


@contextmanager
def raises():
    """Within, Ctrl-C raises KeyboardInterrupt (Python's default), whatever handler was set before, and sets
    PRESSED; one raised where Python would drop it is delivered again. After, the handlers from before. For a
    command's work, which catches the interrupt (or the error a native call made of it), saves and says how to go
    on."""
    PRESSED.clear()
    previous, previous_hook = signal.signal(signal.SIGINT, note_and_raise), sys.unraisablehook

    def unraisable(event):
        if not isinstance(event.exc_value, KeyboardInterrupt):
            return previous_hook(event)
        again = threading.Timer(AGAIN_AFTER, _thread.interrupt_main)
        again.daemon = True
        again.start()

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)


def note_and_raise(signum, frame):
    PRESSED.set()
    signal.default_int_handler(signum, frame)
