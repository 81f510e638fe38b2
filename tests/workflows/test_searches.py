"""Several Tune searches at once, each in its own Ray task, their trial events relayed to the driver's
callbacks (workflows.compute.searches), on a real local Ray with real Tuners."""

from __future__ import annotations

import time

from ray import tune

from workflows.compute.searches import run_concurrently


def search(name: str, storage: str, fail_after: int | None, relay) -> dict:
    """A small real search: 2 trials of 3 steps; the trials raise at ``fail_after`` steps if set."""

    def trainable(config):
        for step in range(1, 4):
            if fail_after is not None and step > fail_after:
                raise ValueError(f"lr {config['lr']} diverged")
            tune.report({"step": step, "score": config["lr"] * step})
            time.sleep(0.2)

    trainable.__name__ = f"trainable_{name}"  # its own name in the job's Tune registry (see the module)
    started = time.time()
    grid = tune.Tuner(trainable, param_space={"lr": tune.grid_search([0.1, 0.2])},
                      tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1),
                      run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[relay])).fit()
    if grid.errors:
        raise ValueError(f"search {name}: {len(grid.errors)} trial(s) failed: {grid.errors[0]}")
    return {"best_lr": grid.get_best_result().config["lr"], "started": started, "ended": time.time()}


class Events(tune.Callback):
    """A driver-side view: writes down (hook, trial id, step) of what it is told."""

    def __init__(self):
        self.seen = []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.append(("start", trial.trial_id, None))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        assert trial.config["lr"] in (0.1, 0.2) and trial.trial_id in {t.trial_id for t in trials}
        self.seen.append(("result", trial.trial_id, result["step"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen.append(("complete", trial.trial_id, None))

    def on_trial_error(self, iteration, trials, trial, **info):
        assert trial.error_file and trial.status in ("RUNNING", "ERROR")
        self.seen.append(("error", trial.trial_id, None))


def test_two_searches_run_at_once_and_relay_every_trial_event(tmp_path, local_ray):
    views = {"flowers": Events(), "cifar": Events()}
    ended = []
    outcomes = run_concurrently({name: (search, (name, str(tmp_path), None)) for name in views},
                                {name: [view] for name, view in views.items()},
                                on_done=lambda name, outcome: ended.append(name))
    assert sorted(ended) == ["cifar", "flowers"] and all(o.error is None for o in outcomes.values())
    assert all(o.value["best_lr"] == 0.2 for o in outcomes.values())
    # at the same time: each search began before the other ended
    assert max(o.value["started"] for o in outcomes.values()) < min(o.value["ended"] for o in outcomes.values())
    for view in views.values():  # each view saw its own search's 2 trials, every step, in order
        trials = {trial for _, trial, _ in view.seen}
        assert len(trials) == 2
        for trial in trials:
            events = [(hook, step) for hook, t, step in view.seen if t == trial]
            assert events == [("start", None), ("result", 1), ("result", 2), ("result", 3), ("complete", None)]
    flowers = {t for _, t, _ in views["flowers"].seen}
    assert not flowers & {t for _, t, _ in views["cifar"].seen}


def test_a_failed_search_or_a_dead_one_does_not_stop_the_other_and_each_keeps_its_error(tmp_path, local_ray):
    from ray.exceptions import WorkerCrashedError

    views = {"good": Events(), "bad": Events()}
    outcomes = run_concurrently({"good": (search, ("good", str(tmp_path), None)),
                                 "bad": (search, ("bad", str(tmp_path), 1)),
                                 "dies": (_exit_task, ())},
                                {name: [view] for name, view in views.items()})
    assert outcomes["good"].error is None and outcomes["good"].value["best_lr"] == 0.2
    error = outcomes["bad"].error
    assert type(error) is ValueError and "search bad: 2 trial(s) failed" in str(error)  # the original, not Ray's wrapper
    assert [hook for hook, _, _ in views["bad"].seen].count("error") == 2
    assert ("result", 1) in {(hook, step) for hook, _, step in views["bad"].seen}
    # a search whose process died (killed, out of memory) is an error too, not a hang
    assert isinstance(outcomes["dies"].error, WorkerCrashedError) and outcomes["dies"].value is None


def _exit_task(relay):
    import os

    os._exit(3)


def test_the_consoles_search_view_reads_the_relayed_trials(tmp_path):
    """`vitflow run`'s view of a search (workflows.cli.live.SearchProgress) is given TrialView snapshots when
    the search runs in its own task: the same lines as from Tune's own Trial objects."""
    from workflows.cli.live import SearchProgress
    from workflows.compute.searches import TrialView, replay

    lines = []
    view = SearchProgress(lines.append, "val/top1", "max", total_steps=6)
    first = TrialView("t1", {"image_size": 32, "lr": 0.01}, "RUNNING")
    replay([view], "on_trial_start", [first], first, {})
    replay([view], "on_trial_result", [first], first, {"result": {"step": 3, "val/top1": 0.5}})
    replay([view], "on_trial_complete", [first], first, {})
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\nValueError: the loss is not finite at step 2\n")
    second = TrialView("t2", {"image_size": 48, "lr": 0.03}, "RUNNING", error_file=str(error))
    replay([view], "on_trial_error", [TrialView("t1", first.config, "TERMINATED"), second], second, {})
    assert lines == [
        "trial t1 started: image_size 32, lr 0.01",
        "trial t1 step 3/6: val top-1 50.00%",
        "trial t1 stopped at step 3/6 (the scheduler stopped it: behind the others)",
        "trials: 0 done, 1 stopped, 0 failed, 0 running; best so far t1 (val top-1 50.00%; image_size 32, lr 0.01)",
        "trial t2 failed: ValueError: the loss is not finite at step 2",
        "trials: 0 done, 1 stopped, 1 failed, 0 running; best so far t1 (val top-1 50.00%; image_size 32, lr 0.01)",
    ]
