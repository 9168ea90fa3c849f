"""``python -m free_dfml.client.supernode ARGS``: Flower's ``flower-supernode`` (same arguments) with
a shorter idle poll.

Flower 1.42's SuperNode sleeps 3 s whenever it asks the SuperLink for a message and none is there;
a submission waits for two messages (the query, then the acknowledgement), so most of a submit's
time on an idle server was those sleeps. Here the SuperNode's module-level clock sleeps at most
``IDLE_POLL_S`` per wait; nothing else changes.
"""

from __future__ import annotations

import time as _time

IDLE_POLL_S = 0.5


class _ShortSleeps:
    """``time`` as the SuperNode's loop sees it, with every sleep capped at ``IDLE_POLL_S``."""

    def __getattr__(self, name: str):
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        _time.sleep(min(seconds, IDLE_POLL_S))


def main() -> None:
    from flwr.supernode import start_client_internal as loop
    loop.time = _ShortSleeps()          # the module's `time.sleep(3)` between empty pulls
    from flwr.supercore.inflatable import inflatable_utils
    inflatable_utils.pull_objects.__kwdefaults__.update(initial_backoff=0.1, backoff_cap=1.0)
    from flwr.supernode.cli import flower_supernode
    flower_supernode()


if __name__ == "__main__":
    main()
