"""How a run's helper processes (the embedded broker, the workers of node agents) know the run is over."""

import os


def wait_for_stop(stop, poll: float = 1.0) -> None:
    """Block a run's helper process (the broker, a worker of node agents) until `stop` is set, or until the process
    that started it is gone: a simulate killed outright (SIGKILL, a closed terminal) cannot set `stop`, and its
    helpers must not outlive it holding a port and CPU."""
    parent = os.getppid()
    while not stop.wait(poll):
        if os.getppid() != parent:  # re-parented: the run's process died
            return
