"""Training on a real Ray cluster: a head and two worker nodes on this machine (CPU only), started
and stopped here. Two Ray Train workers train with DDP over gloo through the `trained_model` asset."""

import hashlib
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import materialize_training
from orchestration.resources import TrainingCompute

# Global batch 32 in every run (2 workers x 16, or 1 process x 32): the same optimizer steps.
TRAINING = {"epochs": 10, "batch_size": 16, "reference_batch": 32, "width": 16, "recipe": "none"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node with no CPUs to schedule on and two worker nodes of one CPU each: the two training
    workers must land on different nodes. Yields the head's address on the loopback interface."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield f"127.0.0.1:{cluster.address.rpartition(':')[2]}"
    finally:
        cluster.shutdown()


def on_ray(address: str, **settings) -> TrainingCompute:
    return TrainingCompute(accelerator="cpu", launcher="ray", ray_address=address, workers=2, num_workers=1, **settings)


def ray_train_workers() -> list[psutil.Process]:
    return [process for process in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(process.info["cmdline"] or [])]


def test_two_ray_workers_train_disjoint_halves_survive_a_killed_worker_and_learn_as_well_as_one_process(
    ray_cluster: str, training_home: Path, digits_splits: dict,
):
    """One Ray job proves the sharding, the restart and the accuracy: each Ray job costs ~30 s of
    start-up and teardown on this machine, more than its training."""
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        # Ray's controller writes its snapshot once it has registered a reported checkpoint.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not list(training_home.glob("checkpoints/*/ray/checkpoint_manager_snapshot.json")):
            time.sleep(0.05)
        workers = ray_train_workers()
        if workers:
            workers[-1].send_signal(signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    # Two attempts of the same data root: the compute is part of an attempt's name.
    on_cluster = materialize_training(training_home, on_ray(ray_cluster, max_failures=1), TRAINING | {"audit_examples": True})
    killer.join(timeout=5)
    single = materialize_training(training_home, TrainingCompute(accelerator="cpu", devices="1", num_workers=1), TRAINING | {"batch_size": 32})

    ray_value, single_value = on_cluster.output_for_node("trained_model"), single.output_for_node("trained_model")
    metadata = on_cluster.asset_materializations_for_node("trained_model")[0].metadata
    assert (ray_value["world_size"], single_value["world_size"]) == (2, 1)
    assert metadata["world_size"].value == 2 and metadata["global_step"].value == ray_value["global_step"]  # reported through Pipes
    steps_per_epoch = 400 // 32
    assert killed, "no Ray training worker was found to kill"
    assert ray_value["resumed_from_step"] >= steps_per_epoch, ray_value  # the restarted workers began from a reported checkpoint
    # ...and finished the epochs left, not all of them again: the same optimizer steps as one process.
    assert ray_value["global_step"] == single_value["global_step"] == TRAINING["epochs"] * steps_per_epoch
    assert ray_value["val_accuracy"] >= single_value["val_accuracy"] - 0.05, (ray_value, single_value)
    assert ray_value["val_accuracy"] >= 0.85

    # The first epoch (before the kill): each worker a disjoint half of the training split.
    audit = training_home / "checkpoints" / ray_value["attempt"] / "audit"
    rank0, rank1 = (json.loads((audit / f"rank{rank}.json").read_text()) for rank in (0, 1))
    train_digests = Counter(hashlib.sha1(image.tobytes()).hexdigest() for image in digits_splits["images"]["train"])
    repeated = {digest for digest, count in train_digests.items() if count > 1}  # identical scans may fall to either worker
    assert len(rank0) == len(rank1) >= 190  # each worker a half of the 400 training images
    assert not (set(rank0) & set(rank1)) - repeated
    assert set(rank0) | set(rank1) <= set(train_digests)
    fit_config = json.loads((training_home / "checkpoints" / ray_value["attempt"] / "fit_config.json").read_text())
    assert fit_config["compute"]["launcher"] == "ray" and fit_config["compute"]["workers"] == 2


def test_an_unreachable_cluster_fails_the_asset_in_one_line_naming_the_address(training_home: Path):
    home = training_home
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    result = materialize_training(home, on_ray(address), TRAINING, raise_on_error=False)
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    description = failure.event_specific_data.error_display_string.strip().splitlines()
    assert f"dagster._core.definitions.events.Failure: training failed: Ray cluster at {address} is unreachable: Connection refused" in description, description


def test_an_unreachable_cluster_fails_dataset_writing_in_one_line_naming_the_address(home: Path):
    """The images no earlier run decoded are decoded on the cluster: unreachable, the asset fails in one
    line (a Failure, not retried), as the training does."""
    import dagster as dg

    from orchestration.assets.datasets import ffcv_datasets
    from tests.conftest import resources_for
    from tests.test_ingestion import GOOD, ingest, write_batch

    write_batch(home / "landing", "some-000", GOOD)
    with dg.instance_for_test() as instance:
        assert ingest("some-000", resources_for(home), instance).success
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    result = dg.materialize([ffcv_datasets], resources=resources_for(home) | {"compute": on_ray(address)}, raise_on_error=False)
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    assert failure.event_specific_data.error.message.strip() == (
        f"dagster._core.definitions.events.Failure: Ray cluster at {address} is unreachable: Connection refused"
    ), failure.event_specific_data.error_display_string


def test_ray_data_measures_a_generated_batch_exactly_as_the_single_machine_path(ray_cluster: str, tmp_path: Path):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transforms.landing import ValidationRules, read_landing_file, validate_batch
    from training.ray_data import measure_on_ray, row_group_tasks
    from transforms.simulate import SimulationSpec, simulate_batches

    (simulated,), _ = simulate_batches(tmp_path / "landing", SimulationSpec(batches=1, batch_size=300, drift="blur", strength=0.5))
    table = pq.read_table(simulated)
    images = table.column("image").to_pylist()
    images[7], images[150] = b"%PDF-1.4 not an image", images[150][:40]  # an undecodable and a truncated image
    column = table.schema.get_field_index("image")
    table = table.set_column(column, table.schema.field(column), pa.array(images, type=table.schema.field(column).type))
    path = tmp_path / "generated.parquet"
    pq.write_table(table, path, row_group_size=64)  # five row groups: five Ray Data tasks
    rules = ValidationRules(classes=(), max_pixels=10_000)
    classes = [str(digit) for digit in range(10)]
    assert len(row_group_tasks(path, set(range(1, 301)))) == 5

    here = validate_batch(path, read_landing_file(path), rules, classes)
    on_ray = validate_batch(path, read_landing_file(path), rules, classes, measure=measure_on_ray(ray_cluster))

    assert here.images.height == 298 and set(here.quarantined["reason"]) == {"undecodable_image"}
    assert on_ray.images.equals(here.images)  # every statistic, bit for bit
    assert on_ray.quarantined.equals(here.quarantined)
    assert on_ray.images.select(pl.col("brightness").std()).item() > 0


def test_ray_data_decodes_the_image_stores_packs_into_the_same_cache_as_this_machine(ray_cluster: str, tmp_path: Path):
    from transforms import warehouse
    from transforms.images import Preprocessing
    from transforms.landing import ValidationRules, read_landing_file, validate_batch
    from training.ray_data import decode_on_ray
    from transforms.simulate import SimulationSpec, simulate_batches

    paths, _ = simulate_batches(tmp_path / "landing", SimulationSpec(batches=2, batch_size=40, drift="rotation", strength=0.5))
    preprocessing = Preprocessing(resolution=24, resize="center_crop", mode="rgb")
    with warehouse.connect(tmp_path / "warehouse.duckdb") as connection:
        for index, path in enumerate(paths):
            batch = validate_batch(path, read_landing_file(path), ValidationRules(classes=(), max_pixels=10_000), [str(d) for d in range(10)])
            warehouse.replace_batch(connection, batch, f"{index}" * 64)
        store = warehouse.image_store(connection)
        packs = warehouse.packs_to_decode(connection, preprocessing)
        assert len(packs) == 2

        assert decode_on_ray(ray_cluster, store.root, packs, preprocessing) == 80
        assert warehouse.packs_to_decode(connection, preprocessing) == []
        on_ray = {pack: store.decoded_path(pack, preprocessing).read_bytes() for pack, _ in packs}
        for pack, locations in packs:
            store.decoded_path(pack, preprocessing).unlink()
            store.decoded(pack, locations, preprocessing)  # this machine's decoding
            assert store.decoded_path(pack, preprocessing).read_bytes() == on_ray[pack]


def test_the_drift_reports_pass_over_a_batch_runs_on_ray_as_on_this_machine(ray_cluster: str, tmp_path: Path):
    import numpy as np
    from safetensors.torch import save_file

    from training.backbones import build_network
    from training.config import ModelConfig
    from training.export import export_fp32
    from training.inference import embed_and_predict, load_classifier, onnx_session, predict_onnx
    from training.ray_inference import embed_and_score_on_ray
    from transforms.image_store import PackPixels

    model = ModelConfig(width=8)
    weights = tmp_path / "weights.safetensors"
    save_file(build_network(model).state_dict(), weights)
    onnx_model = export_fp32(load_classifier(weights, model), model.resolution, tmp_path / "model.onnx")
    np.save(tmp_path / "cache.npy", np.random.default_rng(0).integers(0, 256, (120, 32, 32, 3), dtype=np.uint8))
    images = PackPixels(tmp_path / "cache.npy")  # as the drift report reads a batch: the image store's cache

    embeddings, logits = embed_and_score_on_ray(ray_cluster, images, weights, model, onnx_model, rows_per_task=50)

    here_embeddings, _ = embed_and_predict(load_classifier(weights, model), images[:])
    here_logits = predict_onnx(onnx_session(onnx_model), images[:])
    assert embeddings.shape == here_embeddings.shape == (120, here_embeddings.shape[1]) and logits.shape == (120, 10)
    np.testing.assert_allclose(embeddings, here_embeddings, rtol=1e-4, atol=1e-5)  # three tasks, back in row order
    np.testing.assert_allclose(logits, here_logits, rtol=1e-4, atol=1e-5)
