"""The worker loop survives a database that goes away."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from osteo_node.config import parse_settings
from osteo_node.store import FileStore
from osteo_node.work import Worker


class FlakyQueue:
    """A queue whose claim fails as a dropped PostgreSQL connection does, then works again."""

    def __init__(self, stop: threading.Event) -> None:
        self.calls = 0
        self.stop = stop

    def claim(self, *_args: object, **_kwargs: object) -> None:
        self.calls += 1
        if self.calls <= 2:
            raise OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection"))
        self.stop.set()  # the third claim answered: the loop kept going
        return None


@pytest.mark.parametrize("prefetch", [0, 2])
def test_claim_failure_does_not_stop_the_worker(tmp_path: Path, prefetch: int) -> None:
    settings = parse_settings({"worker": {"poll_interval_s": 0.01, "prefetch": prefetch}}, tmp_path)
    stop = threading.Event()
    queue = FlakyQueue(stop)
    inference = object() if prefetch else None  # never used: no job is handed out
    worker = Worker(settings, queue, FileStore(tmp_path / "store"), inference)  # type: ignore[arg-type]
    assert worker.prefetch == prefetch
    worker.run(stop)
    assert queue.calls == 3
