"""Parsing in worker processes: files are parsed in parallel, and no bad file can stop the batch.

A loader exception is that file's failure. A worker process that dies (segfault in a native parser) breaks the
pool (BrokenProcessPool); the culprit is isolated by re-running the remaining files one at a time in a fresh
pool, and it is reported as failed (CRASH_REASON). A parse that hangs is bounded by `ingest.parse_timeout_s`
(0 = no limit): workers record in shared memory which file they start and when; an overdue one is killed (with
anything it spawned), its file fails with timeout_reason(), and the other unfinished files run again in a fresh
pool. Every pool is shut down with its workers joined (killed first when the run is aborted), so no worker
process outlives a run; when the run itself is killed (kill -9), the kernel kills the forkserver and the workers
with it (ingest/_parser_guard.py).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.report import IngestReport
from ingest.scan import SourceFile

if TYPE_CHECKING:
    from configs import Settings
    from configs.settings import IngestSettings

# What a parse gives: ("ok", documents) or ("error", kind, reason).
Outcome = tuple
ParseFn = Callable[[str, "IngestSettings"], Outcome]

CRASH_REASON = ("解析该文件时解析进程崩溃（可能是文件损坏或解析库的缺陷），已跳过；其余文件不受影响。"
                "可用原程序另存后再导入。")


def timeout_reason(seconds: float) -> str:
    return (f"文件解析超过 {seconds:g} 秒未完成（解析程序可能卡住了，或文件过大、过于复杂），"
            "已终止该解析进程并跳过这个文件；其余文件不受影响。"
            "请检查文件能否用原程序正常打开；如果它只是很大，可调大 ingest.parse_timeout_s 后重新导入。")


# --------------------------------------------------------------------------------------------------------------
# In a worker process
# --------------------------------------------------------------------------------------------------------------
# Where a worker records which task it starts, and when (shared memory set up by WorkerPool).
_TASK_PIDS: Any = None
_TASK_STARTS: Any = None


def _init_worker(members: Any = None, task_pids: Any = None, task_starts: Any = None) -> None:
    """Runs once in each new worker: import the parsers, and register (pid, parent pid) so the pool can kill it."""
    global _TASK_PIDS, _TASK_STARTS
    import ingest.loaders  # noqa: F401  (import the parsers once per worker, not once per file)
    from ingest._parser_guard import die_with_parent

    die_with_parent()  # the forkserver is the parent: kill -9 of the ingest takes both down

    _TASK_PIDS, _TASK_STARTS = task_pids, task_starts
    if members is not None:
        with members.get_lock():
            for k in range(0, len(members), 2):
                if members[k] == 0:
                    members[k], members[k + 1] = os.getpid(), os.getppid()
                    break


def _run_task(parse: ParseFn, i: int, path: str, ingest_settings: IngestSettings) -> Outcome:
    """Runs in a worker: note that task i starts here and now (for the parse timeout), then parse."""
    if _TASK_PIDS is not None:
        _TASK_PIDS[i] = os.getpid()
        _TASK_STARTS[i] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    return parse(path, ingest_settings)


def parse_in_worker(path: str, ingest_settings: IngestSettings) -> Outcome:
    """Runs in a worker: ("ok", documents) or ("error", kind, reason). Never raises for a bad file."""
    from ingest.loaders import LoadError, load_file

    try:
        return ("ok", load_file(Path(path), ingest_settings))
    except LoadError as e:
        return ("error", e.kind, e.reason)
    except MemoryError:
        return ("error", "too_large", "解析该文件时内存不足；可把文件拆小后重新导入。")
    except Exception as e:  # noqa: BLE001 — a parser bug on one file is that file's failure
        return ("error", "corrupt",
                f"解析该文件时出错（{type(e).__name__}: {e}）；文件可能已损坏，可用原程序另存后再导入。")


# --------------------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------------------
def worker_count(settings: Settings, n_files: int) -> int:
    n = settings.ingest.workers or os.cpu_count() or 1
    return max(1, min(n, n_files))


class WorkerPool:
    """A ProcessPoolExecutor whose workers say which task they start and when, so that an overdue one can be
    killed. Killing any worker breaks the executor (every unfinished future gets BrokenProcessPool, never hangs),
    which is what the caller wants: it then knows the culprit and resubmits the rest to a fresh pool.

    Shared memory, fresh for each pool: `members` (pid, parent pid) per worker; per task index, the pid that
    started it and the monotonic time it started (0 = not started).
    """

    def __init__(self, workers: int, n_tasks: int) -> None:
        # forkserver: workers fork from a small clean server process, not from this one (which may hold a loaded
        # torch model and its threads, which fork() does not copy safely).
        ctx = multiprocessing.get_context("forkserver")
        # ingest._parser_guard makes the forkserver die with this process (Linux), its workers with it.
        ctx.set_forkserver_preload(["ingest._parser_guard", "ingest.loaders"])
        self.members = ctx.Array("i", 2 * workers)
        self.task_pids = ctx.RawArray("i", n_tasks)
        self.task_starts = ctx.RawArray("d", n_tasks)
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.members, self.task_pids, self.task_starts))

    def submit(self, parse: ParseFn, i: int, path: str, ingest_settings: IngestSettings) -> Future:
        return self.executor.submit(_run_task, parse, i, path, ingest_settings)

    def started_at(self, i: int) -> float:
        return self.task_starts[i]

    def kill_task(self, i: int) -> None:
        """Kill the worker that started task i (and whatever it spawned)."""
        self._kill(self.task_pids[i])

    def kill_all(self) -> None:
        for k in range(0, len(self.members), 2):
            self._kill(self.members[k])

    def _kill(self, pid: int) -> None:
        import psutil

        parents = {self.members[k + 1] for k in range(0, len(self.members), 2) if self.members[k] == pid}
        if pid <= 0 or not parents:  # not one of this pool's workers (or not registered yet)
            return
        try:
            proc = psutil.Process(pid)
            if proc.ppid() not in parents:  # that worker is gone and its pid was reused: leave it alone
                return
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def shutdown(self, *, clean: bool) -> None:
        """On success let the workers exit; otherwise kill them first, so that nothing (a hung parse included)
        outlives the pool. Either way returns once every worker has exited."""
        if not clean:
            self.kill_all()
        self.executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------------
# Parsing every group
# --------------------------------------------------------------------------------------------------------------
def parse_all(groups: Sequence[list[SourceFile]], settings: Settings, report: IngestReport,
              parse: ParseFn | None = None) -> Iterator[tuple[list[SourceFile], Outcome]]:
    """Yield (group, outcome) as parses finish (the first file of each group is parsed); the time spent waiting
    on workers is the parse phase.

    A parse running longer than `ingest.parse_timeout_s` (0 = no limit) has its worker killed and its file fails
    with timeout_reason(); the pool that broke by it is replaced and the unfinished files run again.
    After a worker dies by itself the remaining files run one at a time until the culprit (the file the lone
    worker was on) is found and failed; then parallel parsing resumes.
    """
    parse = parse or parse_in_worker  # looked up at call time, so a test can substitute the module's function
    remaining = list(range(len(groups)))  # indices into groups, in submission order
    serial = False
    while remaining:
        workers = 1 if serial else worker_count(settings, len(remaining))
        rnd = _Round(WorkerPool(workers, len(groups)), workers, groups, remaining, parse, settings, report)
        clean_exit = False
        try:
            yield from rnd.run()
            clean_exit = True
        except BrokenProcessPool:
            if rnd.timed_out:  # we broke the pool: fail the overdue files, run the others again
                yield from rnd.fail_timed_out()
            elif serial:  # one worker, first-in first-out: the lowest index not yet finished was on it
                yield rnd.fail_crashed()
                serial = False
            else:
                serial = True
        finally:
            rnd.pool.shutdown(clean=clean_exit)


class _Round:
    """One pool's life: submit the remaining tasks (at most 2×workers at once), yield results, kill overdue parses.

    Raises BrokenProcessPool out of run() when a worker died (killed by us for a timeout, or by itself).
    """

    def __init__(self, pool: WorkerPool, workers: int, groups: Sequence[list[SourceFile]], remaining: list[int],
                 parse: ParseFn, settings: Settings, report: IngestReport) -> None:
        self.pool, self.workers, self.groups, self.remaining = pool, workers, groups, remaining
        self.parse, self.settings, self.report = parse, settings, report
        self.limit = settings.ingest.parse_timeout_s
        self.queue = list(reversed(remaining))  # pop() from the end = submit in order
        self.running: dict[Future, int] = {}
        self.timed_out: list[int] = []

    def run(self) -> Iterator[tuple[list[SourceFile], Outcome]]:
        while self.queue or self.running:
            self._submit_more()
            t0 = time.perf_counter()
            finished, _ = wait(self.running, timeout=self._next_check(), return_when=FIRST_COMPLETED)
            self.report.phase_seconds["parse"] += time.perf_counter() - t0
            self._kill_overdue()
            for fut in sorted(finished, key=self.running.__getitem__):
                outcome = fut.result()  # raises BrokenProcessPool if a worker died
                i = self.running.pop(fut)
                self.remaining.remove(i)
                yield self.groups[i], outcome

    def _submit_more(self) -> None:
        # Bounded submission keeps memory flat: parsed documents wait in at most 2×workers results.
        while self.queue and len(self.running) < 2 * self.workers:
            i = self.queue.pop()
            self.running[self.pool.submit(self.parse, i, str(self.groups[i][0].path), self.settings.ingest)] = i

    def _kill_overdue(self) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        for fut, i in self.running.items():
            started = self.pool.started_at(i)
            if not fut.done() and started and now - started > self.limit:
                if i not in self.timed_out:
                    self.timed_out.append(i)
                self.pool.kill_task(i)  # the executor breaks (handled by parse_all); harmless if already dead

    def _next_check(self) -> float | None:
        """How long to wait for a result before looking for overdue parses again (None: no limit, just wait)."""
        if not self.limit:
            return None
        now = time.monotonic()
        deadlines = [s + self.limit - now for i in self.running.values()
                     if i not in self.timed_out and (s := self.pool.started_at(i))]
        return max(0.01, min([1.0, *deadlines]))

    def fail_timed_out(self) -> Iterator[tuple[list[SourceFile], Outcome]]:
        for i in self.timed_out:
            if i in self.remaining:
                self.remaining.remove(i)
                yield self.groups[i], ("error", "timeout", timeout_reason(self.limit))

    def fail_crashed(self) -> tuple[list[SourceFile], Outcome]:
        culprit = min(i for i in self.running.values() if i in self.remaining)
        self.remaining.remove(culprit)
        return self.groups[culprit], ("error", "corrupt", CRASH_REASON)
