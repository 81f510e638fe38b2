"""Several Ray Tune searches at once, sharing the cluster: the downstream tasks of a workflow.

One Tune ``Tuner`` drives one search, and Tune is not made for two in one process (it keeps
process-wide state: the trainable registry, its SIGINT handler, the output context), so each concurrent
search runs in a Ray task of its own (``num_cpus=0``: it only schedules trials; its trials ask for the CPUs
and GPUs), on the driver's node, where a single search's ``Tuner`` would run. What Tune lacks, and this
module adds, is the road back for the driver's view of each search, since Tune callbacks run where the
``Tuner`` runs: :class:`SearchRelay` is the callback in the search's task; it sends each trial event
(start, result, completion, error) with plain snapshots of the trials (:class:`TrialView`: id, config,
status, error file, which is what a view reads) through a Ray queue, and :func:`replay` calls the driver's
own callbacks (e.g. ``workflows.cli.live.SearchProgress``) with them.

One rule for the searches themselves: Tune registers a trainable under its name in the Ray job's registry,
and the trials' processes look it up there, so searches running at once in one job must give their
trainables distinct names (``workflows.stages.finetune`` names its after the search), or one search's
trials run the other's trainable.

:func:`run_concurrently` launches the tasks, relays their events while they run, waits for all of them
(a failed search does not stop the others: their work is kept) and hands back each one's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialView:
    """What a search's view knows of a trial: a picklable snapshot of Tune's ``Trial``."""

    trial_id: str
    config: dict[str, Any]
    status: str
    error_file: str | None = None

    @classmethod
    def of(cls, trial) -> TrialView:
        return cls(str(trial.trial_id), dict(trial.config), str(trial.status), getattr(trial, "error_file", None))


class SearchRelay(tune.Callback):
    """Tune callback in a search's own process: each trial event, as (search, hook, trials, trial, extra),
    onto ``queue`` for the driver to :func:`replay`."""

    def __init__(self, queue, search: str):
        self.queue = queue
        self.search = search

    def __reduce__(self):
        # Tune pickles its RunConfig (callbacks included) into the search's state, for a restore in a later
        # Ray session where this queue no longer exists: the state keeps a callback that does nothing.
        return (tune.Callback, ())

    def _send(self, hook: str, trials, trial, **extra) -> None:
        try:
            self.queue.put((self.search, hook, [TrialView.of(t) for t in trials], TrialView.of(trial), extra),
                           block=False)
        except Exception as error:  # the view is best effort: never end a search
            log.warning("search %s: could not relay %s to the driver: %s", self.search, hook, error)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._send("on_trial_start", trials, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._send("on_trial_result", trials, trial, result=_plain(result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._send("on_trial_complete", trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._send("on_trial_error", trials, trial)


def _plain(result: Mapping[str, Any]) -> dict[str, Any]:
    """A trial result's scalar entries (a result may hold objects that need not cross to the driver)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}


def replay(callbacks: Sequence[Any], hook: str, trials: list[TrialView], trial: TrialView, extra: dict) -> None:
    """Call ``hook`` of each of the driver's ``callbacks`` as Tune would have in the search's process."""
    for callback in callbacks:
        try:
            getattr(callback, hook)(iteration=0, trials=trials, trial=trial, **extra)
        except Exception as error:  # the view is best effort, as Tune's own callbacks would be
            log.warning("a search callback failed on %s: %s", hook, error)


@dataclass(frozen=True)
class Outcome:
    """How one search ended: its return value, or the exception it raised (the original, not Ray's wrapper)."""

    value: Any = None
    error: BaseException | None = None


def run_concurrently(searches: Mapping[str, tuple[Callable[..., Any], tuple]],
                     callbacks: Mapping[str, Sequence[Any]],
                     on_done: Callable[[str, Outcome], None] = lambda name, outcome: None) -> dict[str, Outcome]:
    """Run each search ``name -> (function, args)`` as ``function(*args, relay)`` in its own Ray task, at
    the same time; relay each one's trial events to ``callbacks[name]`` on this driver as they come, and
    call ``on_done(name, outcome)`` as each ends. Returns every outcome once all have ended."""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this driver's node, as one search's Tune driver would be: the searches' experiment state is written
    # where a rerun's driver looks for it (a local storage path stays on this node's disk).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    run = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(_in_task)
    # the relay is made in the task: pickled, it would arrive as the do-nothing callback (see __reduce__)
    pending = {run.options(name=f"search:{name}").remote(function, args, queue, name): name
               for name, (function, args) in searches.items()}
    outcomes: dict[str, Outcome] = {}

    def drain() -> None:
        while True:
            try:
                search, hook, trials, trial, extra = queue.get_nowait()
            except Empty:
                return
            replay(callbacks.get(search, ()), hook, trials, trial, extra)

    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            drain()
            for ref in done:
                name = pending.pop(ref)
                try:
                    outcome = Outcome(value=ray.get(ref))
                except RayTaskError as error:
                    cause = error.cause if isinstance(error.cause, BaseException) else error
                    log.error("search %s failed in its task:\n%s", name, error)
                    outcome = Outcome(error=cause)
                except Exception as error:  # the task's process died (e.g. killed): Ray says so
                    outcome = Outcome(error=error)
                outcomes[name] = outcome
                on_done(name, outcome)
        drain()
    finally:
        for ref in pending:  # the driver is leaving (e.g. interrupted): the searches go with it
            ray.cancel(ref, force=True)
        ray.kill(queue.actor)
    return outcomes


def _in_task(function: Callable[..., Any], args: tuple, queue, name: str) -> Any:
    return function(*args, SearchRelay(queue, name))
