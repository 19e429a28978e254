"""SIGTERM / SIGUSR1 (Slurm's pre-emption and time-limit warnings) end the job cleanly: every rank records the
signal, the F-server makes the round in progress the last one (it is checkpointed), and the other ranks follow
its stop flag. `resume=auto` then continues the run exactly."""
import signal
import threading

SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[str] = []


def install() -> None:
    if threading.current_thread() is threading.main_thread():   # Python only delivers signals there
        for name in SIGNALS:
            signal.signal(getattr(signal, name), lambda signum, frame: _received.append(signal.Signals(signum).name))


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return _received[0] if _received else None
