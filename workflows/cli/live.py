"""What `vitflow run` (and the stage commands) show on the terminal, and where Ray's and Tune's own output goes.

One live view, a line per event: stages (started / reused / done, with duration), pre-training's progress
(step/total, loss, img/s, ETA, val top-1), the search's trials (started, validated, done, stopped, failed;
the best so far), and at the end the MLflow links. Everything else the processes print (Tune's status
tables, Ray's actor and core-worker messages, forwarded worker output, MLflow's and torch's logging) goes
to ``<workdir>/logs/ray-<time>.log``, whose path is printed at the end and on failure; ``verbose`` shows it
on the terminal as before instead.

How the output is split (framework touch point): for the block, file descriptors 1 and 2 of this process
point at the log file (``os.dup2``), so whatever writes to them, Python or C++ (glog), this process or a
Ray daemon it starts, lands there; the view writes to a duplicate of the terminal's stdout. Progress
reaches the view by two structured roads and one line format:
- the search's trials: a Tune ``Callback`` on the driver (``SearchProgress``) sees every trial's results;
- pre-training: Ray forwards its workers' stdout to the driver (``log_to_driver``), so rank 0's
  ``training.Progress`` line reaches the log file; a reader thread follows the file and shows that line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray import tune

from workflows.configs import MODES, FinetuneSettings

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((?P<actor>[\w.]+) pid=\d+(?:, ip=[\d.]+)?\)\s*")  # Ray's forwarded-line prefix
RAY_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]$")
# The lines rank 0 prints (workflows.compute.training): its setup, and Progress's "step N/T | loss ... | img/s | ETA"
# (not vit.loop's "step N/T key=value ..." line, which stays in the log file).
STEP_LINE = re.compile(r"^step \d+/\d+(?: \| |$)")
SETUP_LINE = re.compile(r"^\d+ worker\(s\) on \S+,|^resuming from ")


def duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} m {rest:02d} s" if minutes else f"{rest} s"


class OutputCapture:
    """For the block: this process's stdout and stderr (the descriptors, so C++ and child processes too)
    go to ``log_path``; ``terminal`` writes to where stdout went before. ``on_line`` gets every line
    written to the log file meanwhile, from a reader thread that follows the file."""

    def __init__(self, log_path: Path, on_line: Callable[[str], None]):
        self.log_path = log_path
        self.on_line = on_line
        self.terminal: io.TextIOBase | None = None
        self._saved: dict[int, int] = {}
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> OutputCapture:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.terminal = io.TextIOWrapper(os.fdopen(os.dup(self._saved[1]), "wb"), encoding="utf-8",
                                         errors="replace", line_buffering=True)
        for fd in (1, 2):
            os.dup2(log_fd, fd)
        os.close(log_fd)
        with contextlib.suppress(AttributeError, io.UnsupportedOperation):
            sys.stdout.reconfigure(line_buffering=True)  # forwarded worker lines reach the file as they come
        self._reader = threading.Thread(target=self._follow, name="vitflow-log-follower", daemon=True)
        self._reader.start()
        return self

    def _follow(self) -> None:
        with open(self.log_path, "rb") as handle:
            pending = b""
            while True:
                stopping = self._stop.is_set()
                chunk = handle.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        with contextlib.suppress(Exception):  # the view is best effort: never end the run
                            self.on_line(line.decode("utf-8", errors="replace"))
                elif stopping:
                    return
                else:
                    self._stop.wait(0.2)

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5.0)


class SearchProgress(tune.Callback):
    """Tune callback on the driver (framework touch point): each trial's start, validation results and
    end, and the best trial so far, as lines for the view."""

    def __init__(self, say: Callable[[str], None], metric: str, mode: str, total_steps: int):
        self.say = say
        self.metric, self.mode, self.total_steps = metric, mode, total_steps
        self.last: dict[str, dict[str, Any]] = {}  # trial id -> its last result
        self.ended: dict[str, str] = {}  # trial id -> done / stopped / failed
        self.best: tuple[float, str] | None = None

    def __reduce__(self):
        # Tune pickles its RunConfig (callbacks included) into the search's state; the view stays here.
        return (tune.Callback, ())

    @staticmethod
    def _params(trial) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(trial.config.items()))

    def _score(self, result: Mapping[str, Any]) -> str:
        shown = []
        if "val/top1" in result:
            shown.append(f"val top-1 {result['val/top1']:.2%}")
        if "val/loss" in result:
            shown.append(f"val loss {result['val/loss']:.4f}")
        return ", ".join(shown)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.say(f"trial {trial.trial_id} started: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = dict(result)
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            score = value if self.mode == "max" else -value
            if self.best is None or score > self.best[0]:
                self.best = (score, trial.trial_id)
        self.say(f"trial {trial.trial_id} step {result.get('step', '?')}/{self.total_steps}: {self._score(result)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = self.last.get(trial.trial_id, {}).get("step", 0)
        how = "done" if step >= self.total_steps else "stopped"
        self.ended[trial.trial_id] = how
        self.say(f"trial {trial.trial_id} {how} at step {step}/{self.total_steps}"
                 + (" (the scheduler stopped it: behind the others)" if how == "stopped" else ""))
        self.say(self.summary(trials))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended[trial.trial_id] = "failed"
        reason = ""
        with contextlib.suppress(Exception):
            reason = Path(trial.error_file).read_text().strip().splitlines()[-1]
        self.say(f"trial {trial.trial_id} failed" + (f": {reason}" if reason else " (see the log file)"))
        self.say(self.summary(trials))

    def summary(self, trials) -> str:
        counts = {how: sum(1 for h in self.ended.values() if h == how) for how in ("done", "stopped", "failed")}
        # Tune calls back before it marks the ending trial TERMINATED or ERROR
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended)
        line = (f"trials: {counts['done']} done, {counts['stopped']} stopped, {counts['failed']} failed, "
                f"{running} running")
        if self.best is not None:
            trial = next((t for t in trials if t.trial_id == self.best[1]), None)
            line += f"; best so far {self.best[1]} ({self._score(self.last.get(self.best[1], {}))}"
            line += f"; {self._params(trial)})" if trial is not None else ")"
        return line


class WorkflowConsole:
    """The terminal view of a workflow (or of one stage command), fed by the runner's stage events, the
    training workers' progress lines and the search's Tune callback."""

    def __init__(self, workdir: str | Path, *, name: str, verbose: bool = False):
        self.name = name
        self.verbose = verbose
        self.log_path = Path(workdir).resolve() / "logs" / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.started: dict[str, float] = {}
        self.training: str | None = None  # the stage whose workers' progress lines are shown
        self._capture: OutputCapture | None = None
        self._lock = threading.Lock()
        self._last_worker_line = ""
        self._out: io.TextIOBase = sys.stdout

    # --- output ------------------------------------------------------------------------------------

    def say(self, line: str, stage: str | None = None) -> None:
        with self._lock:
            text = f"{time.strftime('%H:%M:%S')} {f'{stage}: ' if stage else ''}{line}"
            self._out.write(text + "\n")
            self._out.flush()

    def __enter__(self) -> WorkflowConsole:
        if not self.verbose:
            self._capture = OutputCapture(self.log_path, self.worker_line).__enter__()
            self._out = self._capture.terminal
            self.say(f"{self.name}: Ray's and Tune's own output goes to {self.log_path} (--verbose shows it here)")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._capture is not None:
            self._capture.__exit__(kind, error, traceback)
            self._out = sys.stdout
            self._capture.terminal.close()
        if error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt)):
            self.say(f"error: {type(error).__name__}: {error}")
        if self._capture is not None:
            self.say(f"Ray's and Tune's log: {self.log_path}")

    # --- what feeds it -----------------------------------------------------------------------------

    def event(self, stage: str, status: str, link: str) -> None:
        """The runner's stage events: running, reused, finished, failed (and the workflow's own)."""
        if stage == "workflow":
            self.say(f"workflow {self.name} {status}: {link}")
            return
        now = time.monotonic()
        if status == "running":
            self.started[stage] = now
            if stage == "pretrain":
                self.training = stage
            self.say("started" + (f": {link}" if link else ""), stage)
        elif status == "reused":
            self.say(f"reused (unchanged configuration, inputs and code): {link}", stage)
        elif status in ("finished", "failed"):
            took = duration(now - self.started.get(stage, now))
            if self.training == stage:
                self.training = None
            where = f" (Ray's and Tune's log: {self.log_path})" if self._capture is not None else ""
            self.say(f"done in {took}: {link}" if status == "finished" else
                     f"FAILED after {took}" + (f": {link}" if link else "") + where, stage)
        else:
            self.say(f"{status}: {link}", stage)

    def worker_line(self, raw: str) -> None:
        """A line of the log file: rank 0's setup and progress lines of the training stage are shown."""
        if self.training is None:
            return
        line = RAY_REPEATED.sub("", RAY_PREFIX.sub("", ANSI.sub("", raw).strip()))
        # Ray may forward a worker's line twice (its stdout and its log both reach the driver): once here.
        if (STEP_LINE.match(line) or SETUP_LINE.match(line)) and line != self._last_worker_line:
            self._last_worker_line = line
            self.say(line, self.training)

    def search_progress(self, search: FinetuneSettings, stage: str = "finetune") -> SearchProgress:
        """The view of ``search`` (stage ``stage``): its trials ranked by its metric, each out of its total steps."""
        metric = search.search.metric
        return SearchProgress(lambda line: self.say(line, stage), metric, MODES[metric], search.train.total_steps)

    # --- the end -----------------------------------------------------------------------------------

    def summary(self, results: Mapping[str, Any], ui_command: str) -> None:
        """Each stage's outcome and MLflow URIs, and how to browse them."""
        for name, result in results.items():
            shown = result.output_uri or result.model_uri or result.dataset_uri or ""
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if "top1" in k)
            self.say(" ".join(part for part in ("reused" if result.reused else "ran", shown, metrics) if part), name)
        self.say(f"browse the runs and models: {ui_command}   (then open http://127.0.0.1:5000)")
