"""Parallel execution of the participant workflow: nipype's MultiProc scheduler on workers whose
death fails only the node they were running.

nipype's ``MultiProc`` plugin runs nodes in a ``concurrent.futures.ProcessPoolExecutor``. When one
worker is killed (``kill -9``, or the kernel's out-of-memory killer), the executor marks the whole
pool broken and fails every running future; nipype's result callback then raises inside the
executor's thread, the task results never arrive, and the main process polls forever (and, at
exit, waits on the broken pool's thread, so Ctrl-C does not end it either).

:class:`WorkerPoolPlugin` keeps MultiProc's scheduling (dependencies, ``n_procs``/``mem_gb``
accounting) and replaces the executor by a small pool of its own: one ``multiprocessing``
process per worker (``forkserver`` context, see :func:`bids_dmri_ldm.workflows.base._execute`),
each with its own pipe. A worker that dies is noticed at the next poll (every
``poll_sleep_duration`` seconds): the node it was running gets a crash file saying how the worker
ended (so the run fails with that reason and its other nodes are not run), the worker is
replaced, and the other runs go on. Workers ignore SIGINT, so Ctrl-C reaches the main process
only, which then terminates them (:meth:`WorkerPoolPlugin.run`).

Workers are forked from the forkserver, which has imported what the steps need, torch included
(:data:`WORKER_PRELOAD`, ~2.3 s on 2 cores). The steps that need no torch (the interfaces'
``torch_free``) also run in one worker forked from the main process, which never imports torch,
when the pool is made before the server is ready (:meth:`WorkerPoolPlugin._worker_for`).

Workers log like the main process (stderr and the invocation's log file, nipype's records
included, never stdout; :func:`init_worker_logging`).

Test hooks (environment variables read by the workers; tests only):
``BIDS_DMRI_LDM_TEST_KILL_NODE=<text>``: a worker about to run a node whose full name contains
``<text>`` kills itself with SIGKILL, as the out-of-memory killer would.
``BIDS_DMRI_LDM_TEST_HANG_NODE=<text>=<file>``: a worker about to run such a node creates
``<file>`` and then sleeps until it is stopped (a node that never ends, to test Ctrl-C).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from typing import Any

import numpy as np
from nipype.pipeline.plugins.multiproc import (
    MultiProcPlugin,
    process_initializer,
    run_node,
)

from ..vocabulary import Method
from .logs import route_nipype_logs

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

POLL_SECONDS = 0.5
"""Longest sleep between two scheduling passes (nipype's ``poll_sleep_duration``); a worker's
result or death ends it at once (:func:`woken_by_workers`)."""

KILL_NODE_ENV = "BIDS_DMRI_LDM_TEST_KILL_NODE"
"""Environment variable of the worker-death test hook (see the module docstring)."""
HANG_NODE_ENV = "BIDS_DMRI_LDM_TEST_HANG_NODE"
"""Environment variable of the hanging-node test hook (see the module docstring)."""


#: Modules the forkserver imports once, so that each worker forked from it starts ready to run a
#: step (numpy, nibabel, nipype, torch: ~2 s on 2 cores; this module, whose worker loop each
#: worker runs, and nipype's schedulers it imports: 0.2-0.3 s that every worker paid on its own
#: before). Importing runs no torch kernel, so no OpenMP pool or CUDA state exists yet to be
#: inherited (why forkserver and not fork). torch is named: the steps' modules import it only
#: where it is used (the main process loads them and never needs torch), and each worker would
#: otherwise import it on its own (~1 s of CPU each, measured 2026-12-02).
WORKER_PRELOAD = ("torch", "bids_dmri_ldm.interfaces.dwi", "bids_dmri_ldm.interfaces.bids", __name__)

#: What a method's scale-map node imports besides the steps: the learned methods' networks and
#: MONAI (``import monai`` loads every MONAI subpackage: ~0.5 s of CPU on top of the worker's own
#: imports on 2 cores, 2.5 s before :data:`~bids_dmri_ldm.ml.networks.MONAI_UNUSED_PACKAGES`).
#: Neither the worker server (every worker, and the first node, waited for it: 3.4 s before the
#: first step) nor the node itself (3.3 s on the critical path) imports them: one *method worker*,
#: forked from the server as soon as it runs, imports them while the first steps run and is kept
#: for the scale-map node (:func:`start_worker_server`, :class:`WorkerPoolPlugin`). A background
#: import thread in the first worker was measured too and slowed the load step (2026-12-01).
METHOD_PRELOAD = {method.value: ("bids_dmri_ldm.ml.networks", "bids_dmri_ldm.ml.inference")
                  for method in (Method.LDM, Method.CNN)}

_EARLY = {"lock": threading.Lock(), "workers": [], "threads": []}


def start_worker_server(method: str | None = None) -> None:
    """Start this process's forkserver now, with :data:`WORKER_PRELOAD`, so that its imports run
    beside the main process's own start (the device check, indexing the dataset, planning the
    runs) instead of after it, when the first node is sent; and ask it, from background threads,
    for one worker (the first node that needs torch takes it without waiting for the server) and,
    for a method with :data:`METHOD_PRELOAD`, one method worker that imports those modules while
    the first steps run (:class:`WorkerPoolPlugin` adopts both and sends the method worker that
    method's scale-map node). While these are starting (:func:`early_workers_pending`), the pool
    runs the first, torch-free steps in a worker forked from this process instead of waiting for
    the server. Returns at once; the server is started once, and each kind of early worker is
    asked for once while one waits."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    forkserver.ensure_running()
    wanted = [None] + ([str(method)] if METHOD_PRELOAD.get(str(method)) else [])
    starts = []
    with _EARLY["lock"]:  # one waiting worker of each kind at most (main() called again in one process)
        _EARLY["threads"] = [t for t in _EARLY["threads"] if t.is_alive()]  # a finished one left its worker
        stale = [w for w in _EARLY["workers"] if w.serves not in wanted or not w.process.is_alive()]
        _EARLY["workers"] = [w for w in _EARLY["workers"] if w not in stale]
        for serves in wanted:
            if any(t.serves == serves for t in _EARLY["threads"]) or \
                    any(w.serves == serves for w in _EARLY["workers"]):
                continue
            preload = METHOD_PRELOAD.get(serves, ()) if serves else ()
            start = threading.Thread(target=_start_early_worker, args=(context, serves, preload),
                                     name="bids-dmri-ldm-early-worker", daemon=True)
            start.serves = serves
            _EARLY["threads"].append(start)
            starts.append(start)
    for worker in stale:
        worker.stop(kill=True)
    for start in starts:
        start.start()


def _start_early_worker(context, serves: str | None, preload: tuple[str, ...]) -> None:
    # Process.start() waits until the server has imported its preload: in this thread, the main
    # process goes on meanwhile
    try:
        worker = _Worker(context, preload=preload, serves=serves)
    except Exception:  # noqa: BLE001 - no early worker: the pool starts its workers itself
        LOGGER.debug("no early worker", exc_info=True)
        return
    with _EARLY["lock"]:
        discarded = getattr(threading.current_thread(), "discarded", False)
        if not discarded:
            _EARLY["workers"].append(worker)
    if discarded:  # the command ended while this worker started (discard_early_workers)
        worker.stop(kill=True)


def take_early_workers(timeout: float = 30.0) -> list[_Worker]:
    """The workers :func:`start_worker_server` asked for that have started, each handed over once;
    waits up to ``timeout`` seconds for those still starting (whose start ends when the worker
    server has imported its modules; ``0``: does not wait). One still starting after that is
    handed over by a later call."""
    with _EARLY["lock"]:
        threads = list(_EARLY["threads"])
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with _EARLY["lock"]:
        _EARLY["threads"] = [t for t in _EARLY["threads"] if t.is_alive()]
        workers, _EARLY["workers"] = _EARLY["workers"], []
    return [worker for worker in workers if worker.process.is_alive()]


def early_workers_pending() -> bool:
    """Whether a worker :func:`start_worker_server` asked for is still starting (the worker
    server is still importing its modules)."""
    with _EARLY["lock"]:
        return any(thread.is_alive() for thread in _EARLY["threads"])


def discard_early_workers() -> None:
    """Stop the early workers that no pool adopted, so that a command ending in this process
    (a failure before its workflow, nothing left to do) leaves none behind; one still starting
    stops itself as soon as it has started."""
    with _EARLY["lock"]:
        workers, _EARLY["workers"] = _EARLY["workers"], []
        for thread in _EARLY["threads"]:
            thread.discarded = True
        _EARLY["threads"] = []
    for worker in workers:
        worker.stop(kill=True)


class WorkerDiedError(RuntimeError):
    """A worker process ended while running a node (killed, or crashed in native code)."""


def describe_exit(exitcode: int | None) -> str:
    """How a worker process ended, in words (``exitcode`` as :attr:`multiprocessing.Process.exitcode`)."""
    if exitcode is None:
        return "ended without an exit status"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (the kernel's out-of-memory killer sends it; check the memory available)" \
            if number == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def logging_snapshot() -> dict[str, Any]:
    """What a worker needs to log like this process: the handlers set up by the command line
    (stderr, the invocation's log file), the levels of the loggers involved, the warning filters."""
    handlers = []
    for handler in logging.getLogger().handlers:
        if not getattr(handler, "_bids_dmri_ldm", False):
            continue
        formatter = handler.formatter or logging.Formatter()
        spec = ("file", handler.baseFilename) if isinstance(handler, logging.FileHandler) else ("stderr", None)
        handlers.append((*spec, handler.level, formatter._fmt, formatter.datefmt))
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    return {"handlers": handlers, "levels": levels, "warning_filters": [f for f in warnings.filters if _picklable(f)]}


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - e.g. a warning category defined in a function
        return False
    return True


_LOGGERS = ("", "bids_dmri_ldm", "nipype", "nipype.workflow", "nipype.interface", "nipype.utils",
            "nipype.filemanip")


def init_worker_logging(snapshot: dict[str, Any]) -> None:
    """Log in a worker as :func:`logging_snapshot` describes; nipype's records go through those
    handlers only (nipype adds a stdout handler of its own when it is imported: removed here).
    The command line's handlers a worker forked from the main process inherited are replaced, so
    that no record is written twice."""
    root = logging.getLogger()
    for inherited in [h for h in root.handlers if getattr(h, "_bids_dmri_ldm", False)]:
        root.removeHandler(inherited)  # not closed: its stream is the main process's too
    for kind, target, level, fmt, datefmt in snapshot.get("handlers", ()):
        try:
            handler = logging.FileHandler(target) if kind == "file" else logging.StreamHandler(sys.stderr)
        except OSError:  # the main process reports an unwritable log file
            continue
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(fmt, datefmt))
        root.addHandler(handler)
    route_nipype_logs()
    for name, level in snapshot.get("levels", {}).items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    warnings.filters[:] = snapshot.get("warning_filters", warnings.filters)


def _worker_main(conn: Connection, preload: tuple[str, ...] = (), parent_end: int | None = None) -> None:
    """Loop of one worker: import ``preload``; receive ``(cwd, log snapshot)``, then
    ``(node, updatehash, taskid)`` messages, each answered with run_node's result dict.
    ``parent_end``: the main process's end of the pipe, which a worker forked from the main
    process inherited; closed first, so that the worker sees the end of the pipe when the main
    process has gone."""
    if parent_end is not None:
        os.close(parent_end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the node that needs it reports the failure itself
            break
    try:
        cwd, log_snapshot = conn.recv()
    except (EOFError, OSError):  # the main process has gone (or never adopted this worker)
        return
    process_initializer(cwd)
    init_worker_logging(log_snapshot)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the main process has gone
            return
        if message is None:
            return
        node, updatehash, taskid = message
        _test_hooks(node.fullname)
        conn.send(run_node(node, updatehash, taskid))


def _test_hooks(node_name: str) -> None:
    """The test hooks of the module docstring (no effect unless their variables are set)."""
    kill_pattern = os.environ.get(KILL_NODE_ENV)
    if kill_pattern and kill_pattern in node_name:
        os.kill(os.getpid(), signal.SIGKILL)
    pattern, _, marker = os.environ.get(HANG_NODE_ENV, "").partition("=")
    if pattern and pattern in node_name:
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
        while True:
            time.sleep(3600)


class _Worker:
    """One worker process and its pipe. ``preload``: modules it imports first; ``serves``: the
    method whose scale-map node it is kept for (see :data:`METHOD_PRELOAD`), until it ran one.
    A ``fork`` context makes a worker forked from this process (the pool's *torch-free worker*,
    :meth:`WorkerPoolPlugin._worker_for`)."""

    def __init__(self, context, preload: tuple[str, ...] = (), serves: str | None = None):
        self.conn, child = context.Pipe()
        forked = context.get_start_method() == "fork"
        self.process = context.Process(target=_worker_main,
                                       args=(child, tuple(preload), self.conn.fileno() if forked else None),
                                       name="bids-dmri-ldm-worker", daemon=True)
        with warnings.catch_warnings():
            # Python >= 3.12 warns of fork() in a process with threads. The only other threads
            # here are the early workers' starts, blocked reading the server's pipe with no lock
            # held, and the child only runs the worker loop, then os._exit().
            warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
            self.process.start()
        child.close()
        self.taskid: int | None = None
        self.node_name = ""
        self.serves = serves

    def initialise(self, cwd: str, log_snapshot: dict[str, Any]) -> _Worker:
        """Send the worker its working folder and logging (its first message)."""
        self.conn.send((cwd, log_snapshot))
        return self

    def stop(self, kill: bool = False) -> None:
        self.ask_to_stop(kill)
        self.join()

    def ask_to_stop(self, kill: bool = False) -> None:
        """Ask the worker to end (``kill``: SIGTERM) without waiting for it."""
        if self.process.is_alive():
            if kill:
                self.process.terminate()
            else:
                try:
                    self.conn.send(None)
                except OSError:
                    self.process.terminate()

    def join(self) -> None:
        """Wait for the worker to end (5 s, then SIGKILL) and close its pipe."""
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class WorkerPoolPlugin(MultiProcPlugin):
    """nipype MultiProc with workers that may die (see the module docstring).

    ``plugin_args`` as MultiProc's (``n_procs``, ``memory_gb``, ``raise_insufficient``,
    ``mp_context``); the workers log as this process does when the plugin is made
    (:func:`logging_snapshot`).
    """

    def __init__(self, plugin_args: dict[str, Any] | None = None):
        plugin_args = dict(plugin_args or {})
        self._log_snapshot = plugin_args.pop("log_snapshot", None) or logging_snapshot()
        super().__init__(plugin_args=plugin_args)
        self.pool.shutdown(wait=False)  # MultiProc's executor (never started) is not used
        import multiprocessing as mp

        self._context = mp.get_context(self.plugin_args.get("mp_context"))
        self._idle: list[_Worker] = []
        self._busy: dict[int, _Worker] = {}
        self._failed: dict[int, dict[str, Any]] = {}
        self._kept: list[_Worker] = []  # method workers, until they run their method's node
        self._torch_free: _Worker | None = None  # forked from this process (see _worker_for)
        if self.plugin_args.get("mp_context") == "forkserver":
            # ignored when this process's forkserver already runs (start_worker_server)
            self._context.set_forkserver_preload(list(WORKER_PRELOAD))
            self._adopt_early_workers(timeout=0)
            if early_workers_pending() and "fork" in mp.get_all_start_methods():
                # now, before the workflow's threads start (one imports the report's modules): a
                # thread importing a module while this process forks would leave that module's
                # import lock held for good in the child
                try:
                    self._torch_free = _Worker(mp.get_context("fork")).initialise(self._cwd, self._log_snapshot)
                except Exception:  # none: the server's workers take every step
                    LOGGER.debug("no torch-free worker", exc_info=True)

    def _adopt_early_workers(self, timeout: float) -> None:
        """Take over the early workers that have started (:func:`take_early_workers`): a method
        worker is kept for its method's scale-map node, any other one is idle."""
        for worker in take_early_workers(timeout):
            try:
                worker.initialise(self._cwd, self._log_snapshot)
            except OSError:
                worker.stop(kill=True)
                continue
            (self._kept if worker.serves else self._idle).append(worker)

    def _new_worker(self) -> _Worker:
        return _Worker(self._context).initialise(self._cwd, self._log_snapshot)

    def _worker_for(self, node) -> _Worker:
        """The worker to run ``node``: the method worker kept for ``node``'s method if ``node``
        computes scale maps; for a torch-free step (``torch_free``), the torch-free worker when it
        is idle; else an idle worker, else a new one.

        The torch-free worker is forked from this process, which never imports torch, when the
        pool is made while the worker server is still importing its modules
        (:func:`early_workers_pending`): the run's first steps (its shells, loading the DWI, the
        mask) then start ~1.2-2 s earlier than a worker from the server could (measured
        2026-12-02 on 2 cores: the server is ready ~2.3 s after it starts, the main process
        1.2-1.5 s before it). It takes torch-free steps only, so it never pays for torch's import; if
        it dies, a worker from the server takes them.
        """
        # imported by the workflow already
        from ..interfaces.dwi import PredictScaleMaps

        self._adopt_early_workers(timeout=0)
        if isinstance(node.interface, PredictScaleMaps):
            method = str(node.interface.inputs.method)
            if not any(w.serves == method for w in self._kept) and early_workers_pending():
                self._adopt_early_workers(timeout=30.0)
            for worker in self._kept:
                if worker.serves == method:
                    self._kept.remove(worker)
                    return worker
        if getattr(node.interface, "torch_free", False) and self._torch_free is not None \
                and self._torch_free.taskid is None:
            return self._torch_free
        if not self._idle and early_workers_pending():  # the early worker starts no later than a new one
            self._adopt_early_workers(timeout=30.0)
        return self._idle.pop() if self._idle else self._new_worker()

    # -- MultiProc's executor interface -------------------------------------------------------
    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        taskid = self._taskid
        worker = self._worker_for(node)
        try:
            try:
                worker.conn.send((node, updatehash, taskid))
            except OSError:  # the idle worker died meanwhile: a fresh one
                self._forget(worker)
                worker.stop(kill=True)
                worker = self._new_worker()
                worker.conn.send((node, updatehash, taskid))
        except Exception:  # noqa: BLE001 - e.g. a node that cannot be pickled: that node fails
            self._release(worker)
            self._failed[taskid] = {"result": None, "taskid": taskid,
                                    "traceback": traceback.format_exception(*sys.exc_info())}
            self._task_obj[taskid] = None
            return taskid
        worker.taskid, worker.node_name = taskid, node.fullname
        self._busy[taskid] = worker
        self._task_obj[taskid] = worker
        return taskid

    def _get_result(self, taskid):
        if taskid in self._failed:
            return self._failed.pop(taskid)
        worker = self._busy.get(taskid)
        if worker is None:
            return None
        if worker.conn.poll():
            try:
                result = worker.conn.recv()
            except (EOFError, OSError):
                result = None
            if result is not None:
                self._busy.pop(taskid)
                self._release(worker)
                return result
        if worker.process.is_alive():
            return None
        worker.process.join()
        how = describe_exit(worker.process.exitcode)
        self._busy.pop(taskid)
        self._forget(worker)
        worker.stop(kill=True)
        LOGGER.error("the worker running %s %s; that run fails, the others go on", worker.node_name, how)
        message = f"the worker process running {worker.node_name.split('.')[-1]} {how}"
        return {"result": None, "taskid": taskid,
                "traceback": [f"{__name__}.WorkerDiedError: {message}\n"]}

    def _release(self, worker: _Worker) -> None:
        """``worker`` is free again (the torch-free worker stays out of the idle list)."""
        worker.taskid = None
        if worker is not self._torch_free:
            self._idle.append(worker)

    def _forget(self, worker: _Worker) -> None:
        """``worker`` has gone (the torch-free one is not replaced)."""
        if worker is self._torch_free:
            self._torch_free = None

    def _clear_task(self, taskid):
        self._task_obj.pop(taskid, None)

    def _postrun_check(self):
        self._stop_workers(kill=False)

    # -- lifetime ------------------------------------------------------------------------------
    def _stop_workers(self, kill: bool) -> None:
        workers = self._idle + list(self._busy.values()) + self._kept
        if self._torch_free is not None and self._torch_free not in workers:
            workers.append(self._torch_free)
        self._idle, self._busy, self._kept, self._torch_free = [], {}, [], None
        for worker in workers:  # all asked first, so that they end side by side (~0.1 s each)
            worker.ask_to_stop(kill=kill)
        for worker in workers:
            worker.join()

    def run(self, graph, config, updatehash=False):
        """MultiProc's run, its scheduling passes collecting the youngest generation only
        (:func:`young_collections_only`); whatever ends it (an error, Ctrl-C), no worker outlives
        it."""
        self._taken_at_wait = 0  # the most nodes taken on (proc_done) seen by _moved_on in this run
        try:
            with young_collections_only(), woken_by_workers(self):
                return super().run(graph, config, updatehash=updatehash)
        finally:
            self._stop_workers(kill=True)

    def wait_for_workers(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking as soon as a busy worker sends its result or ends.

        No sleep at all after a pass that moved a node on (submitted it, or ran it in this
        process) while another node is ready now, or every node is taken: the derivative sinks
        run in this process one after another (the DWI last), each made ready by the one before,
        and each, then the end of the loop, used to wait a whole :data:`POLL_SECONDS` (~1 s at
        the end of every run, when no worker is busy). Without progress, a ready node that does
        not fit waits as before, so the loop never spins.
        """
        if seconds <= 0 or self._failed:  # a failed submission is handled by the next pass, now
            return
        if _moved_on(self):
            return
        busy = list(self._busy.values())
        if busy:
            wait_ready([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=seconds)
        else:
            time.sleep(seconds)


def _moved_on(plugin) -> bool:
    """Whether ``plugin`` (a MultiProc in nipype's loop) took on more nodes (``proc_done``) than
    at any earlier call, and now either every node is taken or a node whose inputs are all done
    waits (MultiProc's own test of a ready node). Counted against the most ever taken, so a node
    given back (a submission MultiProc undoes) cannot make the loop spin: at most one pass without
    a sleep per node."""
    done = getattr(plugin, "proc_done", None)
    if done is None:  # not in nipype's loop
        return False
    taken = int(np.count_nonzero(done))
    if taken <= plugin._taken_at_wait:
        return False
    plugin._taken_at_wait = taken
    return taken == done.size or bool(np.any(~done & (plugin.depidx.sum(axis=0) == 0).__array__().ravel()))


@contextlib.contextmanager
def woken_by_workers(plugin: WorkerPoolPlugin):
    """Within the block, nipype's scheduling loop sleeps in :meth:`WorkerPoolPlugin.wait_for_workers`.

    The loop sleeps ``poll_sleep_duration`` between passes (its module's ``sleep``), and only a
    worker's result, or a node run in this process (:func:`_moved_on`), makes a new node ready.
    Waiting on the busy workers' pipes and process sentinels instead, a finished node (or a dead
    worker) is handled at once rather than up to one poll later, and the passes can be rare: :data:`POLL_SECONDS` instead of 20 a second, which
    used ~2 s of the main process's CPU in an HCP-size run (py-spy, 2026-12-02), beside the
    workers on 2 cores. nipype has no option for this: its module's ``sleep`` is swapped for the
    block.
    """
    from nipype.pipeline.plugins import base

    saved = getattr(base, "sleep", None)
    if saved is None:  # another nipype: its own polling, as before
        yield
        return
    base.sleep = plugin.wait_for_workers
    try:
        yield
    finally:
        base.sleep = saved


@contextlib.contextmanager
def young_collections_only():
    """Within the block, nipype's MultiProc collects the youngest generation of this process's
    objects where it calls a full ``gc.collect()``.

    MultiProc collects before every scheduling pass (20 per second) to free the results of nodes
    run in its own process. Here every node runs in a worker process, so those collections find
    next to nothing, but each scans every object made since the heap was frozen: while the
    report's modules are imported beside the workflow (matplotlib, dipy: tens of thousands of
    objects) one pass took up to 57 ms, 1.8 s of CPU in an HCP-size run (measured 2026-12-01),
    taken from the first steps on 2 cores. Python's own collections (by allocation counts) go on
    as usual. MultiProc has no option for this: its module's ``gc`` is swapped for the block.
    """
    from nipype.pipeline.plugins import multiproc

    saved = multiproc.gc
    multiproc.gc = _YoungGenerationGC
    try:
        yield
    finally:
        multiproc.gc = saved


class _YoungGenerationGC:
    """Stands for the :mod:`gc` module in nipype's MultiProc (:func:`young_collections_only`)."""

    @staticmethod
    def collect(generation: int = 2) -> int:  # gc.collect's signature; the generation is ignored
        return gc.collect(0)
