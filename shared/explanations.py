"""Where explanations run in a model service: their own threads, each version's explainable form loaded once.

An explanation costs tens to thousands of forward passes, so it never runs on the threads that
serve Predict: a burst of explanations slows other explanations, never predictions. The sync
path answers within the caller's deadline (DEADLINE_EXCEEDED, saying to submit a job instead);
the computation itself cannot be interrupted, so `max_explain_rows` and the step limits bound it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from shared.errors import DeadlineExceededError, InvalidArgumentError
from shared.model_store import Artifacts, Manifest, ModelStore

T = TypeVar("T")

JOB_HINT = "submit it as a job instead (GatewayService.SubmitExplanation), or ask for fewer steps"


class ExplanationRunner(Generic[T]):
    def __init__(self, store: ModelStore | None = None, load: Callable[[Manifest, Artifacts], T] | None = None,
                 threads: int = 1, cached_forms: int = 8) -> None:  # fmt: skip
        self.store = store
        self.load = load
        self.executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="explain")
        self.cached_forms = cached_forms
        self._forms: OrderedDict[tuple[str, int], asyncio.Future] = OrderedDict()

    async def form(self, manifest: Manifest) -> T:
        """The version's explainable form, loaded (and checked) on first use, kept for the next calls."""
        assert self.store is not None and self.load is not None, "this runner loads no forms"
        key = (manifest.name, manifest.version)
        future = self._forms.get(key)
        if future is None or (future.done() and future.exception() is not None):
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.executor, lambda: self.load(manifest, self.store.artifacts(manifest)))
            self._forms[key] = future
            while len(self._forms) > self.cached_forms:
                self._forms.popitem(last=False)
        self._forms.move_to_end(key)
        return await asyncio.shield(future)

    async def run(self, fn: Callable[..., Any], *args: Any, deadline: float | None = None) -> Any:
        """Runs `fn(*args)` on the explanation threads; past the monotonic `deadline`, DEADLINE_EXCEEDED."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        if deadline is None:
            return await future
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except TimeoutError:
            message = f"the explanation did not finish within the call's deadline; {JOB_HINT}"
            raise DeadlineExceededError(message) from None


def check_steps(steps: int, maximum: int, field: str = "steps") -> None:
    if not 0 <= steps <= maximum:
        raise InvalidArgumentError(f"{field}: must be 0 (the default) to {maximum}, got {steps}")


def check_method(method: str, methods: tuple[str, ...]) -> None:
    if method not in methods:
        raise InvalidArgumentError(f"method: unknown method {method!r}; use one of {', '.join(methods)} (or leave it "
                                   "empty for the default)")  # fmt: skip
