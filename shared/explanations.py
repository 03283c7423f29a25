"""Where explanations run in a model service: their own threads, each version's explainable form loaded once.

An explanation costs tens to thousands of forward passes, so it never runs on the threads that
serve Predict: a burst of explanations slows other explanations, never predictions. The sync
path answers within the caller's deadline (DEADLINE_EXCEEDED, saying to submit a job instead),
and the computation stops there too: every method calls `checkpoint()` between its steps (each
forward pass Captum or the Explainer makes), which raises once the call's `Cancellation` is set,
so the thread is free for the next explanation a step after the deadline, not after the limits.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from shared.errors import DeadlineExceededError, InvalidArgumentError
from shared.model_store import Artifacts, Manifest, ModelStore

T = TypeVar("T")

JOB_HINT = "submit it as a job instead (GatewayService.SubmitExplanation), or ask for fewer steps"


class ExplanationCancelled(Exception):
    """Raised at a checkpoint of an explanation whose caller is gone (its deadline passed, or it cancelled)."""


class Cancellation:
    """One explanation's stop flag: set from the event loop, checked by the explanation's thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.checks = 0  # checkpoints passed: how far the explanation got

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise ExplanationCancelled("the explanation was cancelled: its deadline passed or its caller went away")
        self.checks += 1


_current_check: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("explain_check",
                                                                                           default=None)  # fmt: skip


@contextmanager
def cancellable(check: Callable[[], None]) -> Iterator[None]:
    """Within it, `checkpoint()` calls `check`, which raises to stop the explanation (a Cancellation's
    check on the sync path, a job's cancellation and timeout check on the job path)."""
    token = _current_check.set(check)
    try:
        yield
    finally:
        _current_check.reset(token)


JOB_CHECK_S = 1.0  # how often a running explanation job looks for its cancellation (a read of Redis)


def at_most_every(seconds: float, check: Callable[[], None]) -> Callable[[], None]:
    """`check`, called at most once per `seconds` however often the checkpoints come."""
    last = [time.monotonic()]

    def throttled() -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            check()

    return throttled


def cancellable_job(raise_if_cancelled: Callable[[], None]):
    """An explanation job's checkpoints: its cancellation, timeout and trainer shutdown stop it between steps."""
    return cancellable(at_most_every(JOB_CHECK_S, raise_if_cancelled))


def checkpoint() -> None:
    """Called by every explanation method between its steps; outside `cancellable` it does nothing."""
    check = _current_check.get()
    if check is not None:
        check()


def checked(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` with a checkpoint before each call: Captum's methods call it once per chunk of steps."""

    def call(*args: Any, **kwargs: Any) -> Any:
        checkpoint()
        return forward(*args, **kwargs)

    return call


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

    async def run(self, fn: Callable[..., Any], *args: Any, deadline: float | None = None,
                  cancellation: Cancellation | None = None) -> Any:  # fmt: skip
        """Runs `fn(*args)` on the explanation threads; past the monotonic `deadline`, DEADLINE_EXCEEDED, and
        the work stops at its next checkpoint (as it does when the caller cancels)."""
        cancellation = cancellation or Cancellation()
        if deadline is not None and deadline <= time.monotonic():
            cancellation.cancel()
            raise DeadlineExceededError(f"the call's deadline passed before the explanation started; {JOB_HINT}")

        def work() -> Any:
            with cancellable(cancellation.check):
                cancellation.check()  # cancelled while it queued behind other explanations: never start
                return fn(*args)

        future = asyncio.get_running_loop().run_in_executor(self.executor, work)
        # Nobody awaits a cancelled explanation's outcome; retrieve it so it is not logged as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            if deadline is None:
                return await asyncio.shield(future)
            return await asyncio.wait_for(asyncio.shield(future), deadline - time.monotonic())
        except TimeoutError:
            cancellation.cancel()
            message = f"the explanation did not finish within the call's deadline; {JOB_HINT}"
            raise DeadlineExceededError(message) from None
        except asyncio.CancelledError:
            cancellation.cancel()
            raise


def check_steps(steps: int, maximum: int, field: str = "steps") -> None:
    if not 0 <= steps <= maximum:
        raise InvalidArgumentError(f"{field}: must be 0 (the default) to {maximum}, got {steps}")


def check_method(method: str, methods: tuple[str, ...]) -> None:
    if method not in methods:
        raise InvalidArgumentError(f"method: unknown method {method!r}; use one of {', '.join(methods)} (or leave it "
                                   "empty for the default)")  # fmt: skip
