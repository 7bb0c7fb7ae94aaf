"""Training as Kubernetes pods (`compute.launcher: kubernetes`): the Job and headless Service of
`training.kubernetes` are created, and dagster-k8s's client waits for every pod to succeed."""

import time
from pathlib import Path

import dagster as dg
from dagster_k8s.client import DagsterK8sError, DagsterKubernetesClient

from training.config import ComputeConfig
from training.kubernetes import training_manifests

LOG_TAIL_LINES = 50
POLL_SECONDS = 10.0
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def kubernetes_apis():
    """The cluster's batch and core APIs: in a pod, its service account's; elsewhere, the kubeconfig's."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()


def job_name(attempt: str, run_id: str) -> str:
    """A DNS-1123 name per attempt and run: a retried run's Job does not collide with the last one's."""
    return f"flywheel-train-{attempt[:12]}-{run_id[:8]}".lower()


def train_on_kubernetes(
    context: dg.AssetExecutionContext, compute: ComputeConfig, config_path: Path, data_root: Path, name: str,
) -> None:
    """Run the training on the cluster and wait for it; a failed Job fails the step in one line. The
    rank-0 pod's last lines of log go to the run's log either way."""
    job, service = training_manifests(name, config_path, compute, data_root)
    namespace = compute.kubernetes.namespace
    batch, core = kubernetes_apis()
    core.create_namespaced_service(namespace=namespace, body=service)
    batch.create_namespaced_job(namespace=namespace, body=job)
    context.log.info(f"Kubernetes Job {namespace}/{name}: {compute.num_nodes} pod(s) of {compute.devices} process(es)")
    client = DagsterKubernetesClient(batch, core, logger=context.log.debug, sleeper=time.sleep, timer=time.time)
    try:
        client.wait_for_job_success(name, namespace, wait_time_between_attempts=POLL_SECONDS, num_pods_to_wait_for=compute.num_nodes)
    except DagsterK8sError as error:
        raise dg.Failure(description=f"training Job {namespace}/{name} failed: {str(error).splitlines()[0]}") from None
    finally:
        for pod in client.get_pods_in_job(name, namespace):
            if (pod.metadata.annotations or {}).get(COMPLETION_INDEX) == "0":
                log = client.retrieve_pod_logs(pod.metadata.name, namespace, tail_lines=LOG_TAIL_LINES)
                context.log.info(f"pod {pod.metadata.name} (node rank 0), last lines:\n{log}")
        core.delete_namespaced_service(name=name, namespace=namespace)
