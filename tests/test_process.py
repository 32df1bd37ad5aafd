"""common.process: a Ctrl-C while a pool forks its workers (as prep tokenize's and verify's pools do), in a real
forked ProcessPoolExecutor."""
import signal
import subprocess

from tests.conftest import PYTHON, REPO

# A worker gets its Ctrl-C (here sent to itself) after the fork, before its initializer ignores SIGINT; the parent
# gets one while it forks. Held: the worker drops its SIGINT and works, the parent's arrives once the block ends.
POOL = """
import multiprocessing as mp, os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from common.process import ignore_sigint, sigint_held
held = sys.argv[1] == "held"

def start():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    ignore_sigint() if held else signal.signal(signal.SIGINT, signal.SIG_IGN)

pool = ProcessPoolExecutor(2, mp_context=mp.get_context("fork"), initializer=start)
try:
    with sigint_held() if held else nullcontext():
        future = pool.submit(abs, -2)
        os.kill(os.getpid(), signal.SIGINT)
        print("parent: forked its workers", flush=True)
except KeyboardInterrupt:
    print("parent: interrupted", flush=True)
try:
    print("worker:", future.result(timeout=60), flush=True)
except Exception as exc:
    print("worker:", type(exc).__name__, flush=True)
pool.shutdown()
"""


def run_pool(mode: str) -> str:
    # SIGINT's default action in the child, even where the tests run with it ignored (a background job).
    return subprocess.run([PYTHON, "-c", POOL, mode], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)).stdout


def test_a_ctrl_c_while_a_pool_forks_is_dropped_by_the_workers_and_reaches_the_parent_after():
    assert run_pool("held").splitlines() == ["parent: forked its workers", "parent: interrupted", "worker: 2"]


def test_without_it_the_same_ctrl_c_kills_a_worker_mid_start_and_the_parent_mid_fork():
    # The window is real: unheld, the worker dies of its KeyboardInterrupt inside the initializer (the pool breaks)
    # and the parent is interrupted at once, inside the block.
    assert run_pool("unheld").splitlines() == ["parent: interrupted", "worker: BrokenProcessPool"]
