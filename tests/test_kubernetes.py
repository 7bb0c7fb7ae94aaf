"""Training on Kubernetes, without a cluster: the generated Job and Service are checked against the
Kubernetes API's own models and torchrun's own parser, and the `trained_model` asset runs them on a
stand-in for the API that starts each pod of the Job as a local process (two nodes, DDP over gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubernetes.client import ApiClient, V1Job, V1JobStatus, V1ObjectMeta, V1Pod

from orchestration import kubernetes as launcher
from orchestration.resources import TrainingCompute
from tests.conftest import materialize_training
from training.config import ComputeConfig, KubernetesConfig
from training.kubernetes import training_manifests

PODS = {"image": "registry.example/flywheel:1.0", "volume_claim": "flywheel-data"}


def round_trip(manifest: dict, model: str) -> dict:
    """The manifest read into the Kubernetes client's model and written out again: a key the API does
    not know, or a value of the wrong type, would not survive."""
    client = ApiClient()
    return client.sanitize_for_serialization(client._ApiClient__deserialize(manifest, model))


def test_the_job_and_service_are_valid_kubernetes_objects_with_ranks_rendezvous_gpus_and_the_data_volume():
    compute = ComputeConfig(
        launcher="kubernetes", accelerator="gpu", devices=4, num_nodes=3,
        kubernetes=KubernetesConfig(**PODS, gpus_per_node=4, namespace="ml", env_secret="wandb"),
    )
    config_path = Path("/data/flywheel/checkpoints/abc/fit_config.json")
    job, service = training_manifests("flywheel-train-abc", config_path, compute, Path("/data/flywheel"))

    assert round_trip(job, "V1Job") == job and round_trip(service, "V1Service") == service
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["subdomain"] == service["metadata"]["name"] == "flywheel-train-abc"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert container["image"] == PODS["image"] and container["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "data", "mountPath": "/data/flywheel"} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "flywheel-data"}} in pod["volumes"]
    assert job["metadata"]["namespace"] == service["metadata"]["namespace"] == "ml"

    # torchrun reads the command as intended, in the pod of completion index 2.
    from torch.distributed.run import get_args_parser

    command = container["command"]
    assert command[:3] == ["python", "-m", "training.distributed_run"]
    args = get_args_parser().parse_args([part.replace("$(JOB_COMPLETION_INDEX)", "2") for part in command[3:]])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "4", 2)
    assert (args.master_addr, args.master_port) == ("flywheel-train-abc-0.flywheel-train-abc", 29500)
    assert (args.module, args.training_script, args.training_script_args) == (True, "training.fit", [str(config_path)])


class LocalCluster:
    """Kubernetes' batch and core APIs as far as the launcher uses them. A created Job's pods run as
    local processes: `$(JOB_COMPLETION_INDEX)` expanded as Kubernetes does, pod 0's DNS name
    resolving to this machine as the headless Service makes it resolve to pod 0."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.created: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.pods: list[subprocess.Popen] = []

    def create_namespaced_service(self, namespace: str, body: dict) -> None:
        self.created["Service"] = body

    def delete_namespaced_service(self, name: str, namespace: str) -> None:
        self.deleted.append(name)

    def create_namespaced_job(self, namespace: str, body: dict) -> None:
        self.created["Job"] = body
        name = body["metadata"]["name"]
        (container,) = body["spec"]["template"]["spec"]["containers"]
        for index in range(body["spec"]["completions"]):
            command = [
                part.replace("$(JOB_COMPLETION_INDEX)", str(index)).replace(f"{name}-0.{name}", "127.0.0.1")
                for part in container["command"]
            ]
            env = os.environ | {item["name"]: item["value"] for item in container["env"]}
            with open(self.logs / f"pod-{index}.log", "wb") as log:
                self.pods.append(subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=log, stderr=subprocess.STDOUT))

    def list_namespaced_job(self, namespace: str, field_selector: str):
        return SimpleNamespace(items=[V1Job(metadata=V1ObjectMeta(name=self.created["Job"]["metadata"]["name"]))])

    def read_namespaced_job_status(self, name: str, namespace: str) -> V1Job:
        codes = [pod.poll() for pod in self.pods]
        return V1Job(status=V1JobStatus(
            active=codes.count(None), succeeded=codes.count(0), failed=sum(code not in (None, 0) for code in codes),
        ))

    def list_namespaced_pod(self, namespace: str, label_selector: str):
        job = self.created["Job"]["metadata"]["name"]
        return SimpleNamespace(items=[
            V1Pod(metadata=V1ObjectMeta(name=f"{job}-{index}", annotations={launcher.COMPLETION_INDEX: str(index)}))
            for index in range(len(self.pods))
        ])

    def read_namespaced_pod_log(self, name: str, namespace: str, container=None, _preload_content=True, tail_lines=None):
        lines = (self.logs / f"pod-{name.rpartition('-')[2]}.log").read_bytes().splitlines()[-(tail_lines or 0):]
        return SimpleNamespace(data=b"\n".join(lines))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalCluster:
    local = LocalCluster(tmp_path)
    monkeypatch.setattr(launcher, "kubernetes_apis", lambda: (local, local))
    monkeypatch.setattr(launcher, "POLL_SECONDS", 0.5)
    with socket.socket() as free:  # the rendezvous port, free on this machine
        free.bind(("127.0.0.1", 0))
        monkeypatch.setattr("training.kubernetes.RENDEZVOUS_PORT", free.getsockname()[1])
    return local


def on_kubernetes(**pods) -> TrainingCompute:
    return TrainingCompute(accelerator="cpu", launcher="kubernetes", devices="1", num_nodes=2, num_workers=1, kubernetes=PODS | pods)


def test_the_asset_trains_on_two_pods_of_the_generated_job(cluster: LocalCluster, training_home: Path):
    home = training_home

    result = materialize_training(home, on_kubernetes(), {"epochs": 4, "batch_size": 16, "reference_batch": 32, "width": 16, "recipe": "none", "audit_examples": True})

    value = result.output_for_node("trained_model")
    metadata = result.asset_materializations_for_node("trained_model")[0].metadata
    job = cluster.created["Job"]
    assert job["metadata"]["name"] == cluster.deleted[0]  # the Service went away after the Job
    assert json.loads((home / "checkpoints" / value["attempt"] / "fit_config.json").read_text())["compute"]["num_nodes"] == 2
    assert value["world_size"] == metadata["world_size"].value == 2
    assert value["global_step"] == 4 * (400 // 32)
    assert len(list((home / "checkpoints" / value["attempt"] / "audit").glob("rank*.json"))) == 2
    assert value["val_accuracy"] > 0.5, value


def test_a_failed_pod_fails_the_asset_in_one_line_naming_the_job(cluster: LocalCluster, training_home: Path):
    home = training_home
    # Every pod's training refuses its command line and exits with an error.
    original = cluster.create_namespaced_job

    def one_pod_fails(namespace: str, body: dict) -> None:
        body["spec"]["template"]["spec"]["containers"][0]["command"].append("--this-flag-does-not-exist")
        original(namespace, body)

    cluster.create_namespaced_job = one_pod_fails
    result = materialize_training(home, on_kubernetes(), {"epochs": 1, "width": 16, "recipe": "none"}, raise_on_error=False)
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    lines = failure.event_specific_data.error_display_string.strip().splitlines()
    job = cluster.created["Job"]["metadata"]["name"]
    assert any(line.startswith(f"dagster._core.definitions.events.Failure: training Job default/{job} failed: Encountered failed job pods") for line in lines), lines
    assert cluster.deleted == [job]


def test_compute_settings_reach_every_job_that_trains_or_ingests_and_the_gpu_pool_follows_the_clusters_gpus(home: Path):
    import dagster as dg

    from orchestration.definitions import defs
    from orchestration.instance import GPU_POOL, set_training_slots
    from orchestration.project import SettingsError
    from orchestration.resources import FlywheelHome
    from orchestration.settings import load_settings, run_config

    flywheel = FlywheelHome(home=str(home))
    compute = {"launcher": "kubernetes", "num_nodes": 2, "devices": "8", "gpus": 40, "kubernetes": PODS | {"gpus_per_node": 8}}
    flywheel.settings.write_text(json.dumps({"compute": compute, "trained_model": {"epochs": 3}}))
    settings = load_settings(flywheel.settings)
    assert run_config(defs.resolve_job_def("retrain"), settings, {})["resources"] == {"compute": {"config": compute}}
    assert run_config(defs.resolve_job_def("ingest"), settings, {})["resources"] == {"compute": {"config": compute}}
    assert "resources" not in run_config(defs.resolve_job_def("transform"), settings, {})  # dbt only: no compute
    auto = TrainingCompute(launcher="kubernetes", num_nodes=2, kubernetes=PODS | {"gpus_per_node": 4})
    assert auto.compute_config()["devices"] == 4  # devices auto: a process per GPU of the pod
    with dg.instance_for_test() as instance:
        assert set_training_slots(instance, flywheel) == 2  # 40 GPUs, 16 per training
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 2
        flywheel.settings.write_text(json.dumps({"compute": {}}))
        assert set_training_slots(instance, flywheel) == 1  # one machine: one training at a time
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1

    flywheel.settings.write_text(json.dumps({"compute": {"launcher": "ray"}}))
    with pytest.raises(SettingsError, match=r"flywheel.yaml: compute: launcher ray needs ray_address: the cluster's host:port"):
        load_settings(flywheel.settings)
