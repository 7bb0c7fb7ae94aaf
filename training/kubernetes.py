"""The Kubernetes objects of a multi-node training: an Indexed Job of `num_nodes` pods, each running
torchrun over `devices` processes with its completion index as node rank, and a headless Service
that gives pod 0 a stable DNS name (`<job>-0.<job>`) for the rendezvous. Plain Kubernetes: no
operator is needed. The data root is a PersistentVolumeClaim mounted at the same path in every pod
as on the Dagster host, so the paths in the training's config mean the same everywhere."""

from __future__ import annotations

from pathlib import Path

from training.config import ComputeConfig

RENDEZVOUS_PORT = 29500
FINISHED_JOB_TTL_S = 24 * 3600  # finished jobs and their pods' logs stay a day for inspection


def training_manifests(name: str, config_path: Path, compute: ComputeConfig, data_root: Path) -> tuple[dict, dict]:
    """(Job, Service) manifests for the training `config_path` describes."""
    k8s = compute.kubernetes
    nodes, processes = compute.num_nodes, int(compute.devices)
    labels = {"app.kubernetes.io/name": "flywheel", "app.kubernetes.io/component": "training", "flywheel/job": name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": {"flywheel/job": name},
            # Pod 0's name resolves before it reports ready: the other nodes may look it up first.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }
    command = [
        "python", "-m", "training.distributed_run",
        f"--nnodes={nodes}", f"--nproc-per-node={processes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",  # set by Kubernetes in each pod of an Indexed Job
        f"--master-addr={name}-0.{name}", f"--master-port={RENDEZVOUS_PORT}",
        "-m", "training.fit", str(config_path),
    ]
    limits = {"cpu": k8s.cpus_per_node, "memory": k8s.memory_per_node}
    if k8s.gpus_per_node:
        limits["nvidia.com/gpu"] = str(k8s.gpus_per_node)
    container = {
        "name": "training",
        "image": k8s.image,
        "command": command,
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "FLYWHEEL_HOME", "value": str(data_root)},
        ],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [
            {"name": "data", "mountPath": str(data_root)},
            {"name": "shm", "mountPath": "/dev/shm"},  # DataLoader and NCCL share memory beyond the 64 MiB default
        ],
    }
    pod_spec = {
        "subdomain": name,  # with the Service: <job>-<index>.<job> resolves to each pod
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": k8s.volume_claim}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.env_secret:
        container["envFrom"] = [{"secretRef": {"name": k8s.env_secret}}]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels},
        "spec": {
            "completions": nodes,
            "parallelism": nodes,
            "completionMode": "Indexed",
            # A lost node breaks the rendezvous of all: the Job fails, and the asset's retry relaunches
            # the attempt, which resumes from its last checkpoint.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": FINISHED_JOB_TTL_S,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return job, service
