"""Two "nodes" on one CPU machine, launched the way users launch real clusters.

* torchrun: two launcher processes (``--nnodes 2 --nproc_per_node 1 --node_rank 0/1``) on
  127.0.0.1, one gloo worker each; Lightning recognises them by its TorchElasticEnvironment.
* SLURM: two tasks with the ``SLURM_*`` variables srun sets for ``--nodes 2
  --ntasks-per-node 1``; Lightning recognises them by its SLURMEnvironment.

Each runs ``configs/smoke.yaml`` (FreezeUnfreeze: the backbone starts training in epoch 1, with
layer-wise LRs) through the real ``python -m lit_ft fit``, exactly as README "Scaling out" shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
STEPS = 8  # 64 images / (2 ranks x batch 8) = 4 steps per epoch, 2 epochs
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def torchrun(node_rank: int, port: int, *args: str) -> list[str]:
    """The README's torchrun line for one node (``python -m torch.distributed.run`` is ``torchrun``)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "lit_ft", "fit", "--config", str(SMOKE), *CPU, *args,
    ]


class Nodes:
    """Two launched processes (one per "node"), their logs in files, all killed on the way out."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        i = len(self.procs)
        cwd.mkdir(parents=True, exist_ok=True)
        # Logs go to files (a full pipe would block a worker); a new session so that cleanup can
        # end the launcher's workers too, by the group id of the process started here.
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=(self.log_dir / f"node{i}.out").open("w"),
            stderr=(self.log_dir / f"node{i}.err").open("w"), start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def err(self, i: int) -> str:
        return (self.log_dir / f"node{i}.err").read_text()

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def run_nodes(cmds: list[list[str]], cwds: list[Path], envs: list[dict[str, str]], logs: Path,
              expect: tuple[int, ...] | list[int] = (0, 0)) -> Nodes:
    logs.mkdir(parents=True, exist_ok=True)
    nodes = Nodes(logs)
    try:
        for cmd, cwd, env in zip(cmds, cwds, envs):
            nodes.start(cmd, cwd, env)
        codes = nodes.wait()
    finally:
        nodes.kill()
    assert codes == list(expect), f"exit codes {codes}\n" + "\n".join(f"node{i}:\n{nodes.err(i)[-3000:]}" for i in range(len(codes)))
    return nodes


def records(out: Path) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))  # type: ignore[return-value]


def params(record: dict) -> dict[str, torch.Tensor]:
    # BN running statistics are per-rank buffers (DDP broadcasts rank 0's before each forward, so
    # they differ by the last batch's update); the parameters are what all-reduce keeps equal.
    return {k: v for k, v in record["state_dict"].items() if not k.endswith(BUFFERS)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and len(a) > 40
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def record_args(out: Path) -> list[str]:
    return ["--trainer.callbacks+=tests.rank_probe.RankRecord", "--trainer.callbacks.out", str(out)]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> dict:
    """An uninterrupted torchrun run: node 0 on the shared folder, node 1 in a node-local folder."""
    root = tmp_path_factory.mktemp("torchrun")
    shared, local1, out = root / "shared", root / "node1-local", root / "ranks"
    port = free_port()
    args = [*record_args(out), "--trainer.logger.init_args.save_dir", str(shared / "runs")]
    run_nodes([torchrun(0, port, *args), torchrun(1, port, *args)], [shared, local1], [base_env()] * 2, root / "logs")
    r0, r1 = records(out)
    return {"root": root, "shared": shared, "local1": local1, "r0": r0, "r1": r1}


def test_torchrun_two_nodes_keep_ranks_identical_through_a_mid_run_unfreeze(torchrun_run):
    r0, r1 = torchrun_run["r0"], torchrun_run["r1"]
    for rank, r in enumerate((r0, r1)):
        # Lightning's own TorchElasticEnvironment read torchrun's variables: 2 processes, one per node.
        assert (r["environment"], r["strategy"], r["world_size"], r["node_rank"]) == (
            "TorchElasticEnvironment", "DDPStrategy", 2, rank)
        assert r["global_step"] == STEPS and r["images_seen"] == 2 * 64  # all ranks' images, 2 epochs
    assert_same(params(r0), params(r1), "rank 0 vs rank 1")
    assert_same(params({"state_dict": r0["before"]}), params({"state_dict": r1["before"]}), "start")
    changed = lambda k: not torch.equal(r0["before"][k], r0["state_dict"][k])  # noqa: E731
    # The head trained from the start; the backbone only after the unfreeze at epoch 1, and it
    # still ended equal on both ranks (DDP all-reduced the groups that started training mid-run).
    assert changed("model.fc.weight")
    assert changed("model.conv1.0.weight") and changed("model.layer4.0.conv1.weight")


def test_torchrun_two_nodes_write_one_run_directory_from_rank_0(torchrun_run):
    shared, local1 = torchrun_run["shared"], torchrun_run["local1"]
    assert [p.name for p in (shared / "runs").iterdir()] == ["smoke"]
    (run,) = (shared / "runs" / "smoke").iterdir()
    assert run.name == "version_0"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1, files  # one TensorBoard writer: rank 0's
    ckpts = sorted(f for f in files if f.startswith("checkpoints/"))
    assert len(ckpts) == 2 and ckpts[1] == "checkpoints/last.ckpt" and ckpts[0].startswith("checkpoints/best-"), ckpts
    assert set(files) == {"config.yaml", "hparams.yaml", *events, *ckpts}
    # Node 1 ran in its own folder and wrote nothing at all: no lightning_logs, no runs/.
    assert list(local1.rglob("*")) == []
    assert not (shared / "lightning_logs").exists()
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    assert_same(params({"state_dict": last["state_dict"]}), params(torchrun_run["r0"]), "last.ckpt vs rank 0")


def test_sigterm_to_one_nodes_torchrun_stops_the_run_with_a_checkpoint_that_resumes_exactly(tmp_path, torchrun_run):
    # Both nodes share the folder (a cluster's shared disk). Node 1's worker holds after step 6
    # (epoch 1, its 2nd batch, after the unfreeze) until the test sends SIGTERM to node 1's
    # *launcher*, as a scheduler preempting that node would; torchrun forwards it to its worker.
    marker, out = tmp_path / "at-step-6", tmp_path / "ranks"
    port = free_port()
    hold = ["--trainer.callbacks+=tests.rank_probe.HoldForSignal", "--trainer.callbacks.step", "6",
            "--trainer.callbacks.marker", str(marker)]
    (tmp_path / "logs").mkdir()
    nodes = Nodes(tmp_path / "logs")
    try:
        nodes.start(torchrun(0, port, *hold), tmp_path, base_env())
        launcher1 = nodes.start(torchrun(1, port, *hold), tmp_path, base_env())
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert all(p.poll() is None for p in nodes.procs), nodes.err(0)[-3000:] + nodes.err(1)[-3000:]
            assert time.monotonic() < deadline, "training never reached step 6"
            time.sleep(0.05)
        launcher1.send_signal(signal.SIGTERM)
        nodes.wait(timeout=120)
    finally:
        nodes.kill()
    err0 = nodes.err(0)
    # Rank 0 never got a signal, yet stopped at the same batch and wrote the checkpoint.
    assert "lit-ft: interrupted by SIGTERM at global step 6 (epoch 1); saved a resumable checkpoint" in err0, err0[-3000:]
    assert "Connection closed by peer" not in err0 and "Connection closed by peer" not in nodes.err(1)
    assert all(p.returncode != 0 for p in nodes.procs)  # the run did not finish: both launchers report failure
    ckpt = torch.load(tmp_path / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]

    # The same two launch lines plus --ckpt_path last: both nodes resolve it on the shared disk.
    port = free_port()
    resume = [*record_args(out), "--ckpt_path", "last"]
    run_nodes([torchrun(0, port, *resume), torchrun(1, port, *resume)], [tmp_path] * 2, [base_env()] * 2, tmp_path / "logs2")
    r0, r1 = records(out)
    assert r0["global_step"] == STEPS and r0["images_seen"] == 2 * 64
    assert tmp_path / r0["log_dir"] == tmp_path / "runs" / "smoke" / "version_0"  # the same run continues
    assert_same(params(r0), params(r1), "resumed: rank 0 vs rank 1")
    assert_same(params(r0), params(torchrun_run["r0"]), "resumed vs uninterrupted")


def slurm_env(proc_id: int, port: int) -> dict[str, str]:
    """What srun sets for task ``proc_id`` of ``--nodes 2 --ntasks-per-node 1`` (the variables
    Lightning's SLURMEnvironment reads), with both "nodes" on 127.0.0.1."""
    return {
        **base_env(),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "smoke", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": "0", "SLURM_NODEID": str(proc_id), "MASTER_PORT": str(port),
    }


def test_slurm_tasks_train_as_one_run_equal_to_the_torchrun_run(tmp_path, torchrun_run):
    # `srun lit-ft fit --config ... --trainer.num_nodes 2`: each task is a plain lit-ft process.
    out, port = tmp_path / "ranks", free_port()
    cmd = [sys.executable, "-m", "lit_ft", "fit", "--config", str(SMOKE), *CPU, *record_args(out)]
    run_nodes([cmd, cmd], [tmp_path] * 2, [slurm_env(0, port), slurm_env(1, port)], tmp_path / "logs")
    r0, r1 = records(out)
    for rank, r in enumerate((r0, r1)):
        assert (r["environment"], r["world_size"], r["node_rank"]) == ("SLURMEnvironment", 2, rank)
    assert_same(params(r0), params(r1), "rank 0 vs rank 1")
    # Same seed, data and world size as the torchrun run: the launcher changes nothing.
    assert_same(params(r0), params(torchrun_run["r0"]), "SLURM vs torchrun")
    assert [p.name for p in (tmp_path / "runs" / "smoke").iterdir()] == ["version_0"]



def test_sigterm_to_the_process_a_user_started_on_one_machine_stops_every_rank_with_a_checkpoint(tmp_path):
    # `lit-ft fit ... --trainer.devices 2` on one machine: Lightning's launcher starts rank 1 as a
    # child of the process the user started (rank 0). SIGTERM to that process (`kill PID`, a
    # scheduler) reaches rank 0 only; rank 1 must stop at the same batch, and the checkpoint
    # must resume.
    marker = tmp_path / "at-step-3"
    cmd = [sys.executable, "-m", "lit_ft", "fit", "--config", str(SMOKE), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.callbacks+=tests.rank_probe.HoldForSignal", "--trainer.callbacks.step", "3",
           "--trainer.callbacks.marker", str(marker), "--trainer.callbacks.rank", "0"]
    (tmp_path / "logs").mkdir()
    nodes = Nodes(tmp_path / "logs")
    try:
        user_process = nodes.start(cmd, tmp_path, {**base_env(), "MASTER_PORT": str(free_port())})
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert user_process.poll() is None, nodes.err(0)[-3000:]
            assert time.monotonic() < deadline, "training never reached step 3"
            time.sleep(0.05)
        user_process.send_signal(signal.SIGTERM)
        nodes.wait(timeout=120)
    finally:
        nodes.kill()
    err = nodes.err(0)
    assert user_process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "lit-ft: interrupted by SIGTERM at global step 3 (epoch 0); saved a resumable checkpoint" in err
    ckpt = torch.load(tmp_path / "runs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
