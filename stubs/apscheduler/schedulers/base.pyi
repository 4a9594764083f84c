from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

class BaseScheduler:
    def __init__(self, gconfig: Mapping[str, Any] = ..., **options: Any) -> None: ...
    def add_job(
        self,
        func: Callable[..., Any],
        trigger: str | None = None,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        id: str | None = None,
        name: str | None = None,
        misfire_grace_time: int | None = ...,
        coalesce: bool = ...,
        max_instances: int = ...,
        next_run_time: datetime | None = ...,
        jobstore: str = "default",
        executor: str = "default",
        replace_existing: bool = False,
        **trigger_args: Any,
    ) -> Any: ...
    def start(self, paused: bool = False) -> None: ...
    def shutdown(self, wait: bool = True) -> None: ...
