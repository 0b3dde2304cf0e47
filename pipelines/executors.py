"""Where a job's seed batches run: here, in local worker processes, or on a Ray cluster.

An executor maps a function over work items (seed batches) and hands each result back to the
calling process as it arrives, where the job writes it to its resume files (one writer, so
nothing is lost or written twice). What every item needs — the network, the machine and its
bank — is the ``shared`` payload, sent once to each worker and kept there:

* ``serial`` (the default): in this process, in order, on torch's default threads;
* ``processes:N``: N local worker processes (spawned, so no state leaks from the parent), each
  with ``cores // N`` torch threads. A worker that dies (killed, out of memory) is replaced and its
  items are run again, up to ``retries`` times; workers end with their caller, even when it is killed;
* ``ray`` or ``ray:ADDRESS``: tasks on a Ray cluster — a local one started on first use, or the
  cluster at ``ADDRESS`` (``auto``: the one this machine belongs to). Ray re-runs a task whose
  worker died (``max_retries``); its ``shared`` payload goes through the object store once.

A function raising an exception is an error of the job and is not retried. An item's result does
not depend on the executor: the same function runs on the same inputs; float64 sums are
bit-identical at the same number of torch threads per worker — give it with ``:threads=T``
(``serial:threads=1`` reproduces ``processes:2`` on two cores bit for bit). Between thread counts
BLAS splits long sums differently, which moves results in their last bits (docs/reference.md, "Executors").
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Callable, Container, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from patchbank.specs import split_spec

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")
Task = Callable[[Any, Any], Any]
Done = Callable[[Any, Any], None]

RAY_MISSING = "the Ray executor needs Ray, which is not installed: pip install -e '.[cpu,ray]' (the 'ray' extra)"


class Executor(Protocol):
    """Runs ``fn(shared, item)`` for every item and calls ``done(item, result)`` here as each finishes,
    with one progress bar counting ``size(item)`` per finished item."""

    def map(self, fn: Task, shared: Any, items: Sequence[Any], done: Done, desc: str = "", progress: bool = True,
            size: Callable[[Any], int] = lambda item: 1) -> None: ...


def cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _bar(items: Sequence[Any], desc: str, progress: bool, size: Callable[[Any], int]) -> tqdm:
    """One progress bar over all workers, counted in ``size(item)`` units (seeds)."""
    return tqdm(total=sum(size(i) for i in items), desc=desc, disable=not progress)


@dataclass
class SerialExecutor:
    """Every item here, in order (the default), on ``threads`` torch threads (None: torch's default)."""

    threads: int | None = None

    def map(self, fn: Task, shared: Any, items: Sequence[Any], done: Done, desc: str = "", progress: bool = True,
            size: Callable[[Any], int] = lambda item: 1) -> None:
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with _bar(items, desc, progress, size) as bar:
                for item in items:
                    done(item, fn(shared, item))
                    bar.update(size(item))
        finally:
            torch.set_num_threads(before)

    def __str__(self) -> str:
        return "serial" if self.threads is None else f"serial:threads={self.threads}"


# Worker-process state: the shared payloads this worker has unpickled, by token.
_SHARED: dict[str, Any] = {}


def _init_worker(token: str, payload: bytes, threads: int | None, parent: int) -> None:
    exit_with(parent)
    if threads is not None:
        torch.set_num_threads(threads)
    _SHARED[token] = pickle.loads(payload)


def exit_with(parent: int, every: float = 0.5) -> None:
    """End this worker process when ``parent`` (the caller's pid) dies, killed or not: on Linux the kernel sends
    SIGKILL at once (``PR_SET_PDEATHSIG``); everywhere a daemon thread checks every ``every`` seconds that this
    process has not been handed to another parent, and exits if it has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # the caller died before the lines above ran
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-caller", daemon=True).start()


def _call(token: str, fn: Task, item: Any) -> Any:
    return fn(_SHARED[token], item)


@dataclass
class ProcessExecutor:
    """``workers`` spawned local processes with ``threads`` torch threads each (default: cores // workers);
    a dead worker's items are run again on a fresh pool, at most ``retries`` times in all."""

    workers: int = 2
    threads: int | None = None
    retries: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"processes:N needs N >= 1, got {self.workers}")
        if self.threads is None:
            self.threads = max(1, cores() // self.workers)

    def map(self, fn: Task, shared: Any, items: Sequence[Any], done: Done, desc: str = "", progress: bool = True,
            size: Callable[[Any], int] = lambda item: 1) -> None:
        token, payload = uuid.uuid4().hex, pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
        pending = list(range(len(items)))
        restarts = 0
        with _bar(items, desc, progress, size) as bar:
            while pending:
                pool = ProcessPoolExecutor(min(self.workers, len(pending)), mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=(token, payload, self.threads, os.getpid()))
                try:
                    running: dict[Future, int] = {pool.submit(_call, token, fn, items[i]): i for i in pending}
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for f in finished:
                            i = running.pop(f)
                            result = f.result()  # a worker's death raises BrokenProcessPool here
                            done(items[i], result)
                            pending.remove(i)
                            bar.update(size(items[i]))
                except BrokenProcessPool:
                    restarts += 1
                    if restarts > self.retries:
                        raise RuntimeError(f"a worker process died {restarts} times; {len(pending)} item(s) not done "
                                           "(finished ones are kept: re-run to resume)") from None
                    bar.write(f"a worker process died; re-running {len(pending)} item(s) on a fresh pool")
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)

    def __str__(self) -> str:
        return f"processes:{self.workers}"


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(RAY_MISSING) from err
    return ray


def _ray_call(token: str, boxed: list, fn: Task, item: Any, threads: int) -> Any:
    """A Ray task: the shared payload (boxed, so Ray does not fetch it per task) is fetched once per worker."""
    if token not in _SHARED:
        import ray

        _SHARED.clear()  # one job's payload per worker at a time
        _SHARED[token] = ray.get(boxed[0])
    torch.set_num_threads(threads)
    return fn(_SHARED[token], item)


@dataclass
class RayExecutor:
    """Tasks on a Ray cluster: ``address`` None starts (or joins) a local one with ``num_cpus`` CPUs;
    ``auto`` or ``host:port`` joins an existing cluster. Each task takes ``threads`` CPUs and threads;
    ``retries``: re-runs of a task whose worker died (Ray's ``max_retries``)."""

    address: str | None = None
    threads: int = 1
    retries: int = 3
    num_cpus: int | None = None

    def _connect(self, ray) -> None:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": False}
            if self.address is None and self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(**kwargs)

    def map(self, fn: Task, shared: Any, items: Sequence[Any], done: Done, desc: str = "", progress: bool = True,
            size: Callable[[Any], int] = lambda item: 1) -> None:
        ray = _import_ray()
        self._connect(ray)
        token = uuid.uuid4().hex
        boxed = [ray.put(shared)]
        task = ray.remote(_ray_call).options(num_cpus=self.threads, max_retries=self.retries)
        running = {task.remote(token, boxed, fn, item, self.threads): i for i, item in enumerate(items)}
        with _bar(items, desc, progress, size) as bar:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    i = running.pop(ref)
                    done(items[i], ray.get(ref))  # a task that raised re-raises here
                    bar.update(size(items[i]))

    def __str__(self) -> str:
        return "ray" if self.address is None else f"ray:{self.address}"


_MAIN = {"processes": "workers", "ray": "address"}  # the option a bare value after the kind is for


def make_executor(spec: str | Executor | None) -> Executor:
    """An executor from ``serial``, ``processes:N`` (``processes:workers=N``) or ``ray[:ADDRESS]``
    (``ray:address=ADDRESS``), each optionally with ``:threads=T`` (torch threads per worker; the same T gives
    bit-identical results whatever the executor), in the spec grammar of :mod:`patchbank.specs`. An executor is
    returned as is."""
    if spec is None:
        return SerialExecutor()
    if not isinstance(spec, str):
        return spec
    usage = "use serial, processes:N or ray[:ADDRESS] (optionally with :threads=T)"
    kind, parts = split_spec(spec, "executor", main=_MAIN.get, text_option=lambda kind, name: name == "address")
    options = dict(parts)
    if kind not in ("serial", "processes", "ray") or set(options) - {"threads", _MAIN.get(kind)}:
        raise ValueError(f"unknown executor {spec!r}: {usage}")
    threads = None
    if "threads" in options:
        try:
            threads = int(options["threads"])
        except ValueError:
            raise ValueError(f"executor {spec!r}: threads must be an integer, e.g. processes:2:threads=1") from None
        if threads < 1:
            raise ValueError(f"executor {spec!r}: threads must be >= 1")
    if kind == "serial":
        return SerialExecutor(threads)
    if kind == "processes":
        try:
            n = int(options.get("workers", ""))
        except ValueError:
            raise ValueError(f"executor {spec!r}: give the number of processes, e.g. processes:2") from None
        return ProcessExecutor(n, threads)
    return RayExecutor(options.get("address") or None, threads or 1)


def check_executor(spec: str) -> str:
    """Validate an executor spec without starting anything (Ray must be importable for ``ray``)."""
    ex = make_executor(spec)
    if isinstance(ex, RayExecutor):
        _import_ray()
    return spec


def chunks(seeds: Sequence[int], batch: int) -> list[list[int]]:
    """The seed batches of a job: ``seeds`` in order, ``batch`` at a time (the same for every executor)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return [list(seeds[i : i + batch]) for i in range(0, len(seeds), batch)]


def pending(seeds: Sequence[int], batch: int, done: Container[int]) -> list[list[int]]:
    """The batches a resumed job still runs: each of :func:`chunks` without its seeds in ``done``, empty ones dropped."""
    return [c for c in ([s for s in chunk if s not in done] for chunk in chunks(seeds, batch)) if c]


def batch_for(batch: int | None, executor: str | Executor | None) -> int | None:
    """A job's seed batch: as given, else all seeds at once (None) here, or one seed per task on a parallel executor."""
    if batch is not None:
        return batch
    return None if isinstance(make_executor(executor), SerialExecutor) else 1
