"""The slurm/ stage on a real Slurm cluster: two slurmd nodes in network namespaces on this machine."""
import subprocess

import pytest

from tests.slurm_cluster import cluster_fixture


@pytest.fixture(scope="module")
def slurm_cluster():
    yield from cluster_fixture()


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "hostname.out"
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={out}", "--wrap", "srun hostname"],
                               env=slurm_cluster.env, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip()
    assert slurm_cluster.wait_jobs([job], timeout=60) == {job: "COMPLETED"}, slurm_cluster.logs_tail()
    assert sorted(out.read_text().split()) == ["nodea", "nodeb"]
    assert slurm_cluster.final_state(job) == "COMPLETED"
