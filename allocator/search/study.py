"""An Optuna study that several workers share safely: storage set-up, seeds, heartbeats, repeated plans.

* Set-up under a lock: a fresh SQLite file or journal is created by one worker at a time (two workers
  racing through SQLAlchemy's schema creation crash with IntegrityError); RDB servers are retried.
* Seeds per trial: the sampler is rebuilt before every trial from the run's seed and the study's
  counts of finished and running trials, so a lone worker (fresh or resumed) proposes what an
  uninterrupted run would, while workers running side by side draw from different streams.
* Heartbeats: a running trial stamps the time every few seconds; a RUNNING trial whose stamp is
  older than its grace period belongs to a killed worker and is failed (and its plan proposed again)
  by whichever worker sees it, so the quota is always finished.
* Repeated plans: a plan the study already evaluated is answered from the study; one another
  worker is evaluating right now is left to it. Neither counts against the quota.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.search.base import SearchResult
from allocator.search.trust import malformed, repair_journal

log = logging.getLogger(__name__)
HEARTBEAT = "heartbeat"  # trial user attribute: the time of the worker's last sign of life
PLAN = "plan"  # trial user attribute: the plan's level names, set before it is evaluated (a claim)
REPEAT = "repeat_of"  # trial user attribute: the trial whose plan this one repeated (not evaluated)
OVER_QUOTA = "over_quota"
WORKER = "worker"  # trial user attribute: host:pid of the worker running it


def storage_file(url: str) -> Path | None:
    """The local file behind a storage URL (SQLite or journal), or None for a server."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None if "://" in url else Path(url.removeprefix("journal:"))


_HELD: dict[str, int] = {}  # lock files this process holds, and how deep: flock is per open file, not reentrant


@contextlib.contextmanager
def setup_lock(url: str | None) -> Iterator[None]:
    """Hold an exclusive lock beside a local storage file while the study is created and seeded."""
    path = storage_file(url) if url else None
    if path is None:
        yield
        return
    name = str(path.resolve()) + ".setup-lock"  # not .lock: the journal backend takes that name
    if name in _HELD:
        _HELD[name] += 1
        try:
            yield
        finally:
            _HELD[name] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(name, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _HELD[name] = 1
        try:
            yield
        finally:
            del _HELD[name]
            fcntl.flock(f, fcntl.LOCK_UN)


def open_storage(url: str | None, attempts: int = 5):
    """An Optuna storage from a URL: ``sqlite:///x.db``/``postgresql://…`` (RDB) or a journal file path."""
    import optuna

    if url is None:
        return None
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = storage_file(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a worker killed while writing leaves its lock behind; journal writes take milliseconds, so a lock
        # older than 10 s is stale (Optuna's default waits 30 s before breaking it)
        lock = JournalFileOpenLock(str(path), grace_period=10)
        repair_journal(path, lock)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        except (ValueError, KeyError, TypeError) as exc:  # a line damaged before the last, or not Optuna's
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise AllocatorError(
                f"optuna journal {path} is damaged ({first}): delete it or pass another --storage"
            ) from None
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # wait for a busy file
    for attempt in range(attempts):
        try:
            with setup_lock(url):
                return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as exc:  # SQLAlchemy raises many types for unknown dialects and unreachable servers
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if attempt == attempts - 1 or "://" in url and "Can't load plugin" in first:
                raise AllocatorError(
                    f"cannot open optuna storage {url!r} ({first}): use sqlite:///FILE.db, an RDB URL that is "
                    "reachable, or a journal file path"
                ) from None
            time.sleep(0.2 * (attempt + 1))  # another worker was creating the schema: it exists now
    raise AssertionError("unreachable")


def trial_seeded(make: Callable[[int], object], seed: int):
    """A sampler rebuilt before each trial with a seed drawn from ``seed`` and the study's trial counts."""
    from optuna.samplers import BaseSampler
    from optuna.trial import TrialState

    class TrialSeeded(BaseSampler):
        def __init__(self) -> None:
            self.inner = make(seed)

        def before_trial(self, study, trial) -> None:
            states = Counter(t.state for t in study.get_trials(deepcopy=False))
            key = [seed, states[TrialState.COMPLETE], states[TrialState.RUNNING]]
            if states[TrialState.RUNNING] > 1:  # workers side by side see equal counts: their trials differ
                key.append(trial.number)
            self.inner = make(int(np.random.SeedSequence(key).generate_state(1)[0] % 2**31))
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return TrialSeeded()


@contextlib.contextmanager
def heartbeat(trial, interval: float) -> Iterator[None]:
    """Stamp ``trial`` with the time every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a finished trial takes no attribute: the loop is ending
                trial.set_user_attr(HEARTBEAT, time.time())

    trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")  # who holds it (the dashboard shows it)
    trial.set_user_attr(HEARTBEAT, time.time())
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def tell(study, trial, values=None, state=None) -> None:
    """``study.tell`` of this worker's trial, unless another worker already failed it as silent (this process was
    starved past the grace period): the result is dropped and the plan proposed again, as for a killed worker."""
    try:
        study.tell(trial, values, state=state)
    except ValueError:
        now = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if now.state.is_finished():
            log.warning("optuna: trial %d was failed by another worker as silent: its result is dropped, the plan "
                        "will be proposed again", trial.number)  # fmt: skip
            return
        raise


def recover_stale(study, grace: float | None) -> list[int]:
    """Fail the RUNNING trials silent for ``grace`` seconds (None: all of them); returns their numbers.

    A failed trial changes no count the per-trial seeds are drawn from, so the next proposal repeats the
    lost one exactly, as an uninterrupted run made it; queued plans (the seeds) are queued again.
    """
    from optuna.trial import TrialState

    now, recovered = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        if grace is not None and now - last < grace:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except ValueError:  # another worker failed it first
            continue
        queued = t.system_attrs.get("fixed_params")
        if queued:  # a queued plan (a seed) is queued again; a sampled one is proposed again by the sampler
            study.enqueue_trial(queued, user_attrs={k: v for k, v in t.user_attrs.items() if k == "seed"})
        recovered.append(t.number)
    return recovered


def dropped(trial) -> bool:
    """A trial that is no evaluation of the quota: failed, over the quota, or a repeated plan."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    return trial.state in (TrialState.FAIL, TrialState.PRUNED) or OVER_QUOTA in attrs or REPEAT in attrs


def evaluated(study) -> int:
    """Evaluations the study holds: finished trials that ran their own plan."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not dropped(t))


def in_flight(study) -> int:
    """Trials running now (this worker's included)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def earlier_evaluations(study, number: int) -> int:
    """Trials numbered below ``number`` that are, or will be, evaluations of the quota."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and not dropped(t))


def repeat_of(study, number: int, plan: list[str]):
    """The trial that already holds ``plan``: a finished evaluation, or another running one.

    Claims are written before they are checked, so of two workers claiming one plan at once at least the
    later checker sees the other and yields (both may: then neither evaluates it, which is never a repeat).
    """
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number == number or t.user_attrs.get(PLAN) != plan or REPEAT in t.user_attrs:
            continue
        return t
    return None


def _complete(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if PLAN in t.user_attrs and REPEAT not in t.user_attrs]  # fmt: skip


def study_trials_done(study) -> bool:
    """Whether the study holds a finished (non-repeated) trial."""
    return bool(_complete(study))


def study_result(study, problem: Problem, objectives: str = "") -> SearchResult:
    """The study's best plan (baselines kept beside it included), its history, and, for a multi-objective study
    (``objectives``), its Pareto plans."""
    names = [lv.name for lv in problem.levels]
    complete = _complete(study)
    if (bad := malformed(study, complete, names, len(problem.units))) is not None:
        raise AllocatorError(f"study {study.study_name!r} holds a malformed {bad} (damaged, or written by another "
                             "program): start a new storage")  # fmt: skip
    history = [{"trial": t.number, "fitness": t.user_attrs["fitness"], "bytes": t.user_attrs["bytes"],
                "seed": t.user_attrs.get("seed", ""), "seconds": t.user_attrs.get("seconds", 0.0)}
               for t in sorted(complete, key=lambda t: t.number)]  # fmt: skip
    pareto: list[dict] = []
    if objectives:
        front = {t.number for t in study.best_trials}
        seen: set[tuple[str, ...]] = set()  # NSGA-II proposes some plans again: one entry per plan
        bytes_cost = problem.bytes_cost if problem.bytes_cost is not None else problem.cost
        for t in complete:
            plan = tuple(t.user_attrs["plan"])
            if t.number in front and plan not in seen:
                seen.add(plan)
                choice = _indices(names, plan)
                pareto.append({"trial": t.number, "fitness": t.values[0], "choice": choice,
                               "bytes": problem.summed(bytes_cost, choice),
                               "objective": objectives})  # fmt: skip
    candidates = [(t.user_attrs["fitness"], t.number, t.user_attrs["plan"]) for t in complete]
    candidates += [(b["fitness"], -1, b["plan"]) for b in study.user_attrs.get("baselines", {}).values()]
    best = min(candidates, key=lambda c: (c[0], c[1]))
    return SearchResult(_indices(names, best[2]), history=history, front=pareto)


def _indices(names: list[str], plan) -> np.ndarray:
    """Level names (as trials store plans) back to level indices."""
    return np.array([names.index(n) for n in plan])
