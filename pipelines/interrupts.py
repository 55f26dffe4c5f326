"""What `magnet` does on Ctrl-C (SIGINT) or SIGTERM: stop within seconds, say in one line what
stopped and how to continue, and exit 130 (SIGINT) or 143 (SIGTERM).

The first signal raises `Interrupted`, a KeyboardInterrupt, so the libraries clean up as they do on
Ctrl-C: Prefect records the crash, the flows mark their MLflow runs KILLED, Ray is shut down, a
file being written is removed. Their own reports of it (Prefect's "Crash detected!", tracebacks)
would bury the one line, so logging is switched off from then on. Should the clean-up take longer
than `GRACE_SECONDS`, or a second signal come, the line is printed and the process ends at once.

A command says what an interruption leaves and how to continue with `on_interrupt`; `MagnetGroup`
(pipelines/cli.py) installs the handlers around every command and prints the line, and `cli.run`
then ends the process without the interpreter's slow teardown (`end_process`). This module
imports nothing of the project: the flows register here what a hard exit must stop.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import NoReturn

GRACE_SECONDS = 15.0  # clean-up after the first signal: Ray's shutdown and Prefect's take a few
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


_describe: Callable[[], str] | None = None
_received: int | None = None  # the first signal's number, once it came
_said = threading.Lock()  # the line is printed once, by the main thread or the watchdog


def received() -> int | None:
    """The signal that interrupted the command running under `handled`, if one did."""
    return _received


def on_interrupt(describe: Callable[[], str] | None) -> None:
    """What the interrupted line says after ``interrupted:``; called when the signal comes, so it
    can name what the run had reached (e.g. its last checkpoint)."""
    global _describe
    _describe = describe


def magnet_command(*extra: str, flags: Sequence[str] = (), options: Sequence[str] = ()) -> str:
    """This `magnet` command line as typed, without the ``flags`` and the ``options`` (with their
    values) named, ``extra`` appended: the command that continues an interrupted run."""
    kept, args = [], iter(sys.argv[1:])
    for arg in args:
        name = arg.split("=", 1)[0]
        if arg in flags:
            continue
        if name in options:
            if "=" not in arg:
                next(args, None)
            continue
        kept.append(arg)
    return shlex.join(["magnet", *kept, *extra])


def line(signum: int) -> str:
    """The one line printed for an interruption by ``signum``."""
    what = f"magnet stopped on {signal.Signals(signum).name} before it finished"
    if _describe is not None:
        try:
            what = _describe()
        except Exception as error:  # what was reached could not be read: say the signal at least
            what = f"{what} ({type(error).__name__} while reading what it left)"
    return f"interrupted: {what}"


def say(signum: int) -> None:
    """Print the interrupted line on stderr, once per process."""
    if _said.acquire(blocking=False):
        print(line(signum), file=sys.stderr, flush=True)


_handler: Callable[[int, object], None] | None = None  # ours, while `handled` runs


def reclaim_sigterm() -> None:
    """Put `magnet`'s SIGTERM handler back where a library took it: the first line of every flow
    (Prefect's flow engine installs its own for the run, raising its TerminationSignal, which would
    end the command in a traceback with its run FAILED; it puts the previous one back at the end),
    and after every ``ray.init`` (Ray's calls sys.exit, and its core then prints a C++ stack and
    aborts). Outside `magnet` (a deployment run by a Prefect worker, whose cancellation is that
    SIGTERM) it does nothing."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


_before_hard_exit: list[Callable[[], None]] = []


def before_hard_exit(stop: Callable[[], None]) -> None:
    """Have ``stop`` called when the process ends without its exit handlers (the watchdog, a second
    signal): for what would outlive it, such as a child process that ignores SIGINT."""
    _before_hard_exit.append(stop)


def _end_now(signum: int) -> None:
    say(signum)
    for stop in _before_hard_exit:
        with suppress(Exception):  # ending anyway
            stop()
    os._exit(exit_code(signum))


def end_process(code: int) -> NoReturn:
    """End the process the quick way: the exit handlers run (Prefect stops its temporary server,
    which ignores SIGINT and would outlive this process), the interpreter's teardown does not.

    The interrupted line is the last thing the command says: what the exit handlers would print
    (Prefect's log shipper failing on the server it just stopped) goes to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    silent = os.open(os.devnull, os.O_WRONLY)
    os.dup2(silent, sys.stdout.fileno())
    os.dup2(silent, sys.stderr.fileno())
    atexit._run_exitfuncs()  # what sys.exit would run first; the watchdog still guards it
    os._exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the block runs.

    Ray Tune would put its own SIGINT handler in their place (stop the sweep and return as if it
    had ended): TUNE_DISABLE_SIGINT_HANDLER tells it not to. Ray Train installs one only when fit()
    runs in the main thread, which `pipelines.train_driver` avoids.
    """
    global _describe, _received, _said
    _describe, _received, _said = None, None, threading.Lock()
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (a command run from a test's thread)
        return

    def handler(signum: int, frame: object) -> None:
        global _received
        if _received is not None:  # the second signal: the user does not want to wait for the clean-up
            _end_now(signum)
        _received = signum
        logging.disable(logging.CRITICAL)
        watchdog = threading.Timer(GRACE_SECONDS, _end_now, (signum,))
        watchdog.daemon = True
        watchdog.start()
        raise Interrupted(signum)

    global _handler
    _handler = handler
    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        if _received is None:  # after an interruption the handler stays: a second signal ends the exit
            _handler = None
            for signum, old in previous.items():
                signal.signal(signum, old)
