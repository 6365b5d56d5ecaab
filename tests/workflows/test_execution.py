"""The worker pool: the method worker started with the worker server is kept for the scale-map
node of its method, has imported its modules before that node is sent, and ends with the pool."""
import multiprocessing
import sys
import time

import pytest
from nipype.interfaces.utility import Function, IdentityInterface
from nipype.pipeline import engine as pe

from bids_dmri_ldm.interfaces.dwi import PredictScaleMaps
from bids_dmri_ldm.workflows import execution

#: A standard-library module that neither nipype nor the package imports: the method worker's
#: stand-in for MONAI and the networks (which cost ~3 s to import).
PRELOADED = "tabnanny"


def _imported(name):
    import sys

    return name in sys.modules


def _result(plugin, taskid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = plugin._get_result(taskid)
        if result is not None:
            return result
        time.sleep(0.05)
    raise AssertionError("no result from the worker")


@pytest.fixture
def plugin(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(execution.METHOD_PRELOAD, "ldm", (PRELOADED,))
    assert PRELOADED not in sys.modules
    for leftover in execution.take_early_workers():  # from a command run earlier in this process
        leftover.stop(kill=True)
    execution.start_worker_server("ldm")
    pool = execution.WorkerPoolPlugin({"n_procs": 2, "mp_context": "forkserver"})
    pool._adopt_early_workers(timeout=60)  # the pool itself does not wait for them
    yield pool
    pool._stop_workers(kill=True)


def _probe(tmp_path, name, module=PRELOADED):
    node = pe.Node(Function(input_names=["name"], output_names=["imported"], function=_imported), name=name)
    node.inputs.name = module
    node.base_dir = str(tmp_path / "work")
    return node


def test_the_method_worker_waits_for_its_scale_map_node_with_its_modules_imported(plugin, tmp_path):
    assert [worker.serves for worker in plugin._kept] == ["ldm"]
    kept = plugin._kept[0]
    other = plugin._worker_for(pe.Node(IdentityInterface(fields=["x"]), name="select_shells"))
    assert other is not kept and plugin._kept == [kept]  # any other node: another worker
    plugin._idle.append(other)
    cnn = pe.Node(PredictScaleMaps(method="cnn"), name="predict_scale")
    assert plugin._worker_for(cnn) is other and plugin._kept == [kept]  # another method's: not it
    plugin._idle.append(other)
    scale = pe.Node(PredictScaleMaps(method="ldm"), name="predict_scale")
    assert plugin._worker_for(scale) is kept and plugin._kept == []
    plugin._idle = [kept, other]

    # the kept worker imported the method's modules; a worker forked from the server did not
    for worker, expected in ((kept, True), (other, False)):
        plugin._idle = [worker]
        taskid = plugin._submit_job(_probe(tmp_path, f"probe_{int(expected)}"))
        result = _result(plugin, taskid)
        assert result["traceback"] is None, result["traceback"]
        assert result["result"].outputs.imported is expected


def test_every_worker_starts_with_torch_imported(plugin, tmp_path):
    """The steps' modules import torch only where it is used (the main process loads them), so
    the server names torch in its preload: a worker forked from it has torch before its first
    node (else each worker imported it on its own, ~1 s of CPU each)."""
    assert "torch" in execution.WORKER_PRELOAD
    taskid = plugin._submit_job(_probe(tmp_path, "probe_torch", module="torch"))
    result = _result(plugin, taskid)
    assert result["traceback"] is None, result["traceback"]
    assert result["result"].outputs.imported is True


def test_pool_end_stops_a_method_worker_that_never_ran(plugin):
    kept = list(plugin._kept)
    assert len(kept) == 1 and kept[0].process.is_alive()
    plugin._stop_workers(kill=False)
    assert not kept[0].process.is_alive() and plugin._kept == []
    assert execution.take_early_workers() == []  # handed over once


def test_a_second_command_in_one_process_gets_one_early_worker_of_each_kind(plugin):
    execution.start_worker_server("ldm")
    execution.start_worker_server("ldm")
    extra = execution.take_early_workers()
    try:
        assert sorted(extra, key=lambda w: str(w.serves)) and \
            sorted(str(worker.serves) for worker in extra) == ["None", "ldm"]
    finally:
        for worker in extra:
            worker.stop(kill=True)


def test_a_method_worker_no_pool_adopted_is_stopped_when_the_command_ends(plugin):
    """discard_early_workers: a started one is stopped; one still starting stops itself."""
    plugin._stop_workers(kill=True)
    execution.start_worker_server("ldm")
    with execution._EARLY["lock"]:
        threads = list(execution._EARLY["threads"])
    execution.discard_early_workers()  # (most likely) while the worker is still starting
    for thread in threads:
        thread.join(60)
    assert execution._EARLY["workers"] == [] and execution._EARLY["threads"] == []
    assert not [p for p in multiprocessing.active_children() if p.name == "bids-dmri-ldm-worker"]
    execution.start_worker_server("ldm")
    started = execution.take_early_workers()
    assert sorted(str(worker.serves) for worker in started) == ["None", "ldm"]
    execution._EARLY["workers"].extend(started)  # as if never adopted
    execution.discard_early_workers()
    assert not started[0].process.is_alive() and execution._EARLY["workers"] == []


def test_scheduling_passes_collect_the_youngest_generation_only():
    import gc

    from nipype.pipeline.plugins import multiproc

    generations = []

    def record(phase, info):
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(record)
    try:
        with execution.young_collections_only():
            multiproc.gc.collect()  # MultiProc's call before each scheduling pass
        assert generations and set(generations) == {0}  # not the full collection nipype asks for
        assert multiproc.gc is gc
        with pytest.raises(KeyError), execution.young_collections_only():
            raise KeyError("the block ends in an error")
        assert multiproc.gc is gc  # restored whatever ended the block
    finally:
        gc.callbacks.remove(record)


def test_scheduling_loop_sleeps_until_a_busy_worker_answers(monkeypatch):
    """Between two passes nipype's loop sleeps in ``wait_for_workers``: on the busy workers'
    pipes and process sentinels (so a result or a dead worker ends the sleep), not at all while a
    failed submission waits for its pass, plainly when no worker is busy; restored after."""
    from types import SimpleNamespace

    from nipype.pipeline.plugins import base

    calls = []
    monkeypatch.setattr(execution, "wait_ready", lambda ready, timeout: calls.append((list(ready), timeout)))
    monkeypatch.setattr(execution.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    ours, theirs = multiprocessing.Pipe()
    worker = SimpleNamespace(conn=ours, process=SimpleNamespace(sentinel=12345))
    plugin = SimpleNamespace(_busy={1: worker}, _failed={})
    original = base.sleep
    with execution.woken_by_workers(SimpleNamespace(wait_for_workers=lambda s: execution.WorkerPoolPlugin
                                                    .wait_for_workers(plugin, s))):
        assert base.sleep is not original
        base.sleep(0.5)                                   # what nipype's loop calls
    assert base.sleep is original
    assert calls == [([ours, 12345], 0.5)]
    calls.clear()
    execution.WorkerPoolPlugin.wait_for_workers(plugin, 0.0)     # the pass overran: no sleep
    plugin._failed[2] = {}
    execution.WorkerPoolPlugin.wait_for_workers(plugin, 0.5)     # a failed submission: at once
    plugin._failed.clear()
    plugin._busy.clear()
    execution.WorkerPoolPlugin.wait_for_workers(plugin, 0.5)     # nothing running
    assert calls == [("sleep", 0.5)]
    ours.close()
    theirs.close()
    monkeypatch.delattr(base, "sleep")  # a nipype without that name: left to its own polling
    with execution.woken_by_workers(plugin):
        assert not hasattr(base, "sleep")


def test_a_readable_pipe_ends_the_wait():
    """The real wait returns for a worker whose result is already in its pipe (a broken wiring
    would sleep the whole hour asked for: the waiting thread would still be alive after the
    generous join below, and the test fails instead of hanging)."""
    import threading
    from types import SimpleNamespace

    ours, theirs = multiprocessing.Pipe()
    alive, _keep = multiprocessing.Pipe()  # stands for a running process's sentinel: never ready
    theirs.send("result")
    plugin = SimpleNamespace(_busy={1: SimpleNamespace(conn=ours, process=SimpleNamespace(sentinel=alive.fileno()))},
                             _failed={})
    waiting = threading.Thread(target=execution.WorkerPoolPlugin.wait_for_workers, args=(plugin, 3600.0), daemon=True)
    waiting.start()
    waiting.join(timeout=600)
    assert not waiting.is_alive()
    assert ours.poll() and ours.recv() == "result"
    for conn in (ours, theirs, alive, _keep):
        conn.close()


def test_a_pass_that_moved_a_node_on_is_followed_at_once(monkeypatch):
    """After a pass that took a node on, the next pass comes at once when another node is ready
    (the derivative sinks run one after another in this process, each made ready by the one
    before) or every node is taken (the loop then ends); without progress the loop sleeps as
    before, so it never spins on a ready node that does not fit."""
    from types import SimpleNamespace

    import numpy as np
    from scipy.sparse import lil_matrix

    sleeps = []
    monkeypatch.setattr(execution.time, "sleep", sleeps.append)
    depidx = lil_matrix((3, 3))
    depidx[0, 1] = depidx[1, 2] = 1  # a chain 0 -> 1 -> 2; MultiProc clears a row when its node is done
    plugin = SimpleNamespace(_busy={}, _failed={}, _taken_at_wait=0, depidx=depidx)

    def wait(proc_done):
        plugin.proc_done = np.array(proc_done)
        sleeps.clear()
        execution.WorkerPoolPlugin.wait_for_workers(plugin, 0.5)
        return sleeps == [0.5]

    depidx[0, 1] = 0
    assert not wait([True, False, False])   # 0 ran here, 1 is ready: the next pass at once
    assert wait([True, False, False])       # nothing moved since (1 did not fit): sleep
    assert wait([True, True, False])        # 1 submitted, 2 waits for it: sleep
    assert not wait([True, True, True])     # every node taken: the loop can end at once
    assert wait([True, True, True])
    assert wait([True, True, False])        # a node given back, then taken again: no progress
    assert wait([True, True, True])
    del plugin.proc_done                    # outside nipype's loop: sleep as asked
    sleeps.clear()
    execution.WorkerPoolPlugin.wait_for_workers(plugin, 0.5)
    assert sleeps == [0.5]


def test_stopping_the_pool_asks_every_worker_before_waiting_for_any():
    """Workers end side by side: each is asked to stop before the first is joined."""
    from types import SimpleNamespace

    events = []

    def worker(name):
        return SimpleNamespace(ask_to_stop=lambda kill: events.append(("ask", name, kill)),
                               join=lambda: events.append(("join", name)))

    plugin = SimpleNamespace(_idle=[worker("a")], _busy={7: worker("b")}, _kept=[worker("c")],
                             _torch_free=worker("d"))
    execution.WorkerPoolPlugin._stop_workers(plugin, kill=False)
    assert events == [("ask", "a", False), ("ask", "b", False), ("ask", "c", False), ("ask", "d", False),
                      ("join", "a"), ("join", "b"), ("join", "c"), ("join", "d")]
    assert plugin._idle == [] and plugin._busy == {} and plugin._kept == [] and plugin._torch_free is None


# ---------------------------------------------------------------------------------------------
# the torch-free worker: the first steps run before the worker server has imported torch


def _parent_pid():
    import os

    return os.getppid()


def _log_once(text):
    import logging

    logging.getLogger("bids_dmri_ldm").warning(text)
    return text


def _torch_free_node(tmp_path, name, function=_parent_pid, **inputs):
    node = pe.Node(Function(input_names=list(inputs), output_names=["out"], function=function), name=name)
    for key, value in inputs.items():
        setattr(node.inputs, key, value)
    node.interface.torch_free = True  # as SelectShells, LoadDWI and BrainMask declare
    node.base_dir = str(tmp_path / "work")
    return node


def _pool_while_the_server_starts(monkeypatch, tmp_path):
    """A pool made while the worker server is (as far as it knows) still importing its modules."""
    monkeypatch.chdir(tmp_path)
    for leftover in execution.take_early_workers():
        leftover.stop(kill=True)
    monkeypatch.setattr(execution, "early_workers_pending", lambda: True)
    monkeypatch.setattr(execution, "take_early_workers", lambda timeout=30.0: [])
    return execution.WorkerPoolPlugin({"n_procs": 2, "mp_context": "forkserver"})


@pytest.fixture
def starting_pool(monkeypatch, tmp_path):
    pool = _pool_while_the_server_starts(monkeypatch, tmp_path)
    yield pool
    pool._stop_workers(kill=True)


def test_a_torch_free_step_runs_in_a_worker_forked_from_the_main_process_while_the_server_starts(
        starting_pool, tmp_path):
    import os

    assert starting_pool._torch_free is not None  # forked when the pool was made
    first = _torch_free_node(tmp_path, "first")
    worker = starting_pool._worker_for(first)
    assert worker is starting_pool._torch_free
    result = _result(starting_pool, starting_pool._submit_job(first))
    assert result["traceback"] is None, result["traceback"]
    assert result["result"].outputs.out == os.getpid()  # forked from this process, not from the server
    # idle again: the next torch-free step takes it; a step that needs torch never does
    assert starting_pool._worker_for(_torch_free_node(tmp_path, "second")) is worker
    other = starting_pool._worker_for(pe.Node(IdentityInterface(fields=["x"]), name="fit_rish"))
    assert other is not worker and other.process.is_alive()
    starting_pool._idle.append(other)
    # the server's workers are forked from it
    torch_step = _probe(tmp_path, "probe_server", module="torch")
    starting_pool._idle = [other]
    result = _result(starting_pool, starting_pool._submit_job(torch_step))
    assert result["traceback"] is None, result["traceback"]


def test_no_torch_free_worker_once_the_server_is_ready(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(execution, "early_workers_pending", lambda: False)
    pool = execution.WorkerPoolPlugin({"n_procs": 2, "mp_context": "forkserver"})
    try:
        worker = pool._worker_for(_torch_free_node(tmp_path, "first"))
        assert pool._torch_free is None and worker.process.is_alive()
        pool._idle.append(worker)
    finally:
        pool._stop_workers(kill=True)


def test_a_dead_torch_free_worker_is_not_replaced(starting_pool, tmp_path):
    """Its step fails as any worker's death fails one (the run's other steps go on), and the
    next torch-free step goes to a worker from the server."""
    node = _torch_free_node(tmp_path, "dies")
    taskid = starting_pool._submit_job(node)
    dead = starting_pool._busy[taskid]
    assert dead is starting_pool._torch_free
    dead.process.kill()
    result = _result(starting_pool, taskid)
    assert result["result"] is None and "was killed by SIGKILL" in result["traceback"][0]
    assert starting_pool._torch_free is None
    other = starting_pool._worker_for(_torch_free_node(tmp_path, "next"))
    assert other is not dead and other.process.is_alive()
    starting_pool._idle.append(other)


def test_the_torch_free_worker_ends_when_the_main_process_has_gone(starting_pool, tmp_path):
    """It holds no copy of the main process's end of its pipe (a forked child inherits it), so it
    sees the end of the pipe, as a worker from the server does, and exits."""
    worker = starting_pool._worker_for(_torch_free_node(tmp_path, "first"))
    assert worker is starting_pool._torch_free
    worker.conn.close()  # what the main process's exit does
    worker.process.join(60)
    assert not worker.process.is_alive() and worker.process.exitcode == 0
    starting_pool._torch_free = None


def test_the_torch_free_worker_logs_each_record_once(monkeypatch, tmp_path):
    """It inherited the command line's handlers: replaced by those of the snapshot, not added to."""
    import logging

    log_file = tmp_path / "invocation.log"
    handler = logging.FileHandler(log_file)
    handler._bids_dmri_ldm = True
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        pool = _pool_while_the_server_starts(monkeypatch, tmp_path)
        try:
            node = _torch_free_node(tmp_path, "logs", function=_log_once, text="torch-free-worker-record")
            taskid = pool._submit_job(node)
            assert pool._busy[taskid] is pool._torch_free
            result = _result(pool, taskid)
            assert result["traceback"] is None, result["traceback"]
        finally:
            pool._stop_workers(kill=False)
    finally:
        root.removeHandler(handler)
        handler.close()
    assert log_file.read_text().count("torch-free-worker-record") == 1


TORCH_FREE_STEPS = """
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
from bids_dmri_ldm.interfaces import dwi as interfaces
from bids_dmri_ldm.interfaces.steps import ShellOptions

dwi, bval, bvec, work = sys.argv[1:5]
marked = sorted(name for name, cls in vars(interfaces).items()
                if isinstance(cls, type) and getattr(cls, "torch_free", False))
ran = []
import os
os.chdir(work)
sel = interfaces.SelectShells(dwi_file=dwi, bval_file=bval, bvec_file=bvec,
                              options=ShellOptions(tolerance=100.0, sh_order_max=4).to_dict()).run()
ran.append("SelectShells")
loaded = interfaces.LoadDWI(dwi_file=dwi, plan_file=sel.outputs.plan_file).run()
ran.append("LoadDWI")
img = nib.load(loaded.outputs.mean_b0_file)
given = nib.Nifti1Image(np.ones(tuple(2 * n for n in img.shape), np.uint8), img.affine @ np.diag([0.5, 0.5, 0.5, 1]))
nib.save(given, Path(work) / "given_mask.nii.gz")  # another grid: resampled onto the DWI's
for in_mask in (None, str(Path(work) / "given_mask.nii.gz")):
    interfaces.BrainMask(mean_b0_file=loaded.outputs.mean_b0_file, mean_dwi_file=loaded.outputs.mean_dwi_file,
                         bad_voxels_file=loaded.outputs.bad_voxels_file, in_mask=in_mask).run()
ran.append("BrainMask")
print(" ".join(marked), "|", " ".join(sorted(set(ran))), "|", "torch" in sys.modules)
"""


def test_the_steps_marked_torch_free_import_no_torch(bids_dataset, tmp_path):
    """Known answer for each step marked ``torch_free`` (all of them run here): after it ran, on a
    real run, torch was never imported in that process."""
    import subprocess
    from pathlib import Path

    dwi = bids_dataset.dwi_files[0]
    root = bids_dataset.root
    out = subprocess.run([sys.executable, "-c", TORCH_FREE_STEPS, str(dwi), str(root / "dwi.bval"),
                          str(root / "dwi.bvec"), str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=False)
    assert out.returncode == 0, out.stderr
    marked, ran, torch_imported = (part.strip() for part in out.stdout.strip().split("|"))
    assert marked.split() and marked == ran  # every marked step ran
    assert torch_imported == "False"


def test_a_pool_whose_torch_free_worker_cannot_start_runs_without_it(monkeypatch, tmp_path):
    real = execution._Worker

    def worker(context, *args, **kwargs):
        if context.get_start_method() == "fork":
            raise OSError("no fork here")
        return real(context, *args, **kwargs)

    monkeypatch.setattr(execution, "_Worker", worker)
    pool = _pool_while_the_server_starts(monkeypatch, tmp_path)
    try:
        assert pool._torch_free is None
        taskid = pool._submit_job(_torch_free_node(tmp_path, "first"))
        result = _result(pool, taskid)
        assert result["traceback"] is None, result["traceback"]
    finally:
        pool._stop_workers(kill=True)
