"""The watchdog (train.watchdog): a rank that hangs inside an update (tests.heal_probe makes rank 1 sleep in a
forward) ends in every rank's stacks on stderr and exit status HUNG_EXIT; the rerun resumes from the last
checkpoint. The two ranks are started as srun starts them: one process each, rendezvous from the environment."""
import os
import subprocess

from tests.conftest import REPO
from tests.fixtures_run import run_train, train_command
from tests.fixtures_run import free_port
from train.watchdog import HUNG_EXIT

SETS = ["eval.every=0", "sample.every=0", "log.tensorboard=false", "schedule.max_steps=4", "checkpoint.every=2",
        "heal.watchdog_minutes=0.25"]


def test_a_hung_rank_ends_in_every_ranks_stacks_and_the_requeue_status_then_resumes(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, tiny_dataset, *SETS, module="tests.heal_probe")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "HEAL_PROBE_HANG": "3:1"}
    ranks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for r, (rank, (_out, err)) in enumerate(zip(ranks, outputs)):
        assert rank.returncode == HUNG_EXIT, err[-3000:]
        assert (f"error: rank {r}: no update finished for " in err and "(heal.watchdog_minutes 0.25) after update 2; "
                f"exiting with status {HUNG_EXIT} to be requeued" in err), err[-3000:]
        assert 'Thread 0x' in err and "(most recent call first):" in err  # faulthandler's stacks, all threads
        assert 'in _watch' in err  # the watchdog's own thread is among them
    assert "heal_probe.py" in outputs[1][1] and "in hook" in outputs[1][1]  # rank 1: where it sleeps
    assert "in all_reduce" in outputs[0][1]  # rank 0: waiting for rank 1 in a collective of the update
    # The rerun resumes from the checkpoint of update 2 and finishes (on 1 rank: through a universal checkpoint).
    rerun = run_train(train_command(run_dir, tiny_dataset, *SETS), check_rc=0)
    assert f"resuming from {run_dir}/checkpoints/global_step2_universal at step 2" in rerun.stdout, rerun.stdout
    assert (run_dir / "checkpoints/latest").read_text().strip() == "global_step4"
