"""`flywheel`: land images or simulate landing batches, import labels, run one tick of the loop, tune, predict with the champion, show status.

Errors a user can cause end with a one-line message and exit code 2, never only a traceback.
"""

import argparse
import json
import sys
from pathlib import Path

from orchestration.resources import FlywheelHome


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def _flywheel() -> FlywheelHome:
    return FlywheelHome()


def cmd_simulate(args: argparse.Namespace) -> None:
    from transforms.simulate import SimulationSpec, simulate_batches

    try:
        spec = SimulationSpec(
            batches=args.batches, batch_size=args.size, resolution=args.resolution, drift=args.drift,
            strength=args.strength, labeled=not args.unlabeled, pool=args.pool, prefix=args.prefix, seed=args.seed,
            offset=args.offset,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    flywheel = _flywheel()
    written, kept = simulate_batches(flywheel.landing, spec, overwrite=args.overwrite)
    for path in written:
        print(f"landed {path}")
    for path in kept:
        print(f"kept existing {path} (use --overwrite to replace it)")


def cmd_land(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from transforms.land import LandError, default_prefix, land, open_source

    flywheel = _flywheel()
    problems: list[str] = []
    try:
        source = open_source(args.source, args.labels, problems)
        with tqdm(total=source.total, desc=f"landing {args.source}", unit="image", disable=None) as bar:
            report = land(source, flywheel.landing, args.batch_id or default_prefix(args.source), args.batch_size, problems, bar.update)
    except LandError as error:
        raise UserError(str(error)) from None
    for problem in report.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    for path in report.written:
        print(f"landed {path}")
    print(
        f"landed {report.landed} new image(s) in {len(report.written)} batch file(s); "
        f"{report.already_landed} already landed; {len(report.problems)} skipped"
    )
    if report.problems:
        sys.exit(1)


def cmd_run(args: argparse.Namespace) -> None:
    from flywheel.run_lock import exclusive_run
    from orchestration.settings import SettingsError, load_settings

    if args.config and args.select:
        raise UserError("--config applies to a loop tick; with --select, set values in the Dagster UI's launchpad")
    flywheel = FlywheelHome(settings_file=args.config) if args.config else _flywheel()
    try:
        if args.config or flywheel.settings.exists():
            load_settings(flywheel.settings)  # checked as a whole before anything runs
    except SettingsError as error:
        raise UserError(str(error)) from None
    with exclusive_run(flywheel.root, wait=not args.no_wait, log=lambda message: print(message, file=sys.stderr)):
        _run_locked(args, flywheel)


def _run_locked(args: argparse.Namespace, flywheel: FlywheelHome) -> None:
    from orchestration.definitions import defs
    from orchestration.instance import get_instance, process_tags, set_training_slots
    from flywheel.loop import TickFailed, failure_message, recover_abandoned_runs, run_tick
    from training.registry import Registry
    from flywheel.summary import print_tick_summary

    instance = get_instance(flywheel.root)
    set_training_slots(instance, flywheel)
    if args.select:
        import dagster as dg

        keys = selected_assets(defs, args.select, args.partition)
        recover_abandoned_runs(instance, Registry(flywheel.registry), print)
        result = dg.materialize(
            list(defs.assets), selection=keys, instance=instance, resources=defs.resources,
            partition_key=args.partition, raise_on_error=False, tags=process_tags(),
        )
        if not result.success:
            raise UserError(f"materializing {args.select!r} failed: {failure_message(result)}")
        print(f"materialized {', '.join(sorted(k.to_user_string() for k in keys))}")
        return
    try:
        report = run_tick(defs, instance, flywheel)
    except TickFailed as error:
        raise UserError(str(error)) from None
    print_tick_summary(report, flywheel)
    if report.failed:
        sys.exit(1)


def selected_assets(defs, selection: str, partition: str | None) -> list:
    """The asset keys of a selection, with the assets that must run with them (one multi-asset
    writes several); a one-line UserError for an unknown asset or a partitioned one without --partition."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    try:
        keys = dg.AssetSelection.from_string(selection).resolve(graph)
    except Exception as error:  # Dagster's parse and subset errors, for a selection the user typed
        raise UserError(f"--select {selection!r}: {str(error).splitlines()[0]}; assets: "
                        f"{', '.join(sorted(k.to_user_string() for k in graph.get_all_asset_keys()))}") from None
    if not keys:
        raise UserError(f"--select {selection!r} selects no asset")
    for key in list(keys):
        definition = defs.resolve_assets_def(key)
        if not definition.can_subset:
            keys |= definition.keys  # written together by one step
    partitioned = sorted(k.to_user_string() for k in keys if defs.resolve_assets_def(k).partitions_def is not None)
    if partitioned and partition is None:
        raise UserError(f"{', '.join(partitioned)} {'is' if len(partitioned) == 1 else 'are'} partitioned by batch: "
                        "add --partition BATCH_ID (a landed batch id)")
    if partitioned and len(partitioned) < len(keys):
        raise UserError(f"{', '.join(partitioned)} (partitioned by batch) cannot run in one materialization with "
                        f"{', '.join(sorted(k.to_user_string() for k in keys if k.to_user_string() not in partitioned))}: select them apart")
    return sorted(keys)


def cmd_tune(args: argparse.Namespace) -> None:
    import pydantic

    from flywheel.run_lock import exclusive_run
    from orchestration.assets.training import TuneJobConfig
    from orchestration.settings import current_settings

    flywheel = _flywheel()
    settings = current_settings(flywheel)
    overrides = {name: value for name, value in {"trials": args.trials, "timeout_minutes": args.timeout_minutes}.items() if value is not None}
    try:
        tuning = TuneJobConfig(**settings.get("tuned_hyperparameters", {}) | overrides).model_dump()
    except pydantic.ValidationError as error:
        raise UserError(f"{error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
    with exclusive_run(flywheel.root, wait=not args.no_wait, log=lambda message: print(message, file=sys.stderr)):
        from flywheel.loop import failure_message
        from orchestration.definitions import defs
        from orchestration.instance import get_instance, process_tags
        from orchestration.settings import run_config

        job = defs.resolve_job_def("tune")
        result = job.execute_in_process(
            run_config=run_config(job, settings | {"tuned_hyperparameters": tuning}, {}),
            instance=get_instance(flywheel.root), tags=process_tags(), raise_on_error=False,
        )
        if not result.success:
            raise UserError(f"tuning failed: {failure_message(result)}")
    tuned = result.output_for_node("tuned_hyperparameters")
    best = tuned["best"]
    values = ", ".join(f"{name} {value:.4g}" for name, value in best["values"].items())
    print(f"study {best['study']}: {tuned['added']} trials added ({tuned['complete']} complete, {tuned['pruned']} pruned "
          f"in the study so far); best trial {best['trial']}: val loss {best['val_loss']:.4f}, accuracy "
          f"{best['val_accuracy']:.4f} with {values}")
    print("the next retraining of this backbone uses these values (trained_model's use_tuned); the gates still decide what ships")


def cmd_predict(args: argparse.Namespace) -> None:
    from flywheel.predict import predict_files

    flywheel = _flywheel()
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    written, problems = predict_files([Path(f) for f in args.files], Path(args.output), flywheel, args.top_k)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"wrote {written} predictions to {args.output}")
    if problems:
        sys.exit(1)


def cmd_rollback(args: argparse.Namespace) -> None:
    from training.registry import Registry

    from training.tracking import log_champion

    flywheel = _flywheel()
    registry = Registry(flywheel.registry)
    before = registry.champion_pointer()
    after = registry.rollback(to=args.to)
    print(f"champion: {before or 'none'} -> {after.version}")
    run = log_champion(after.path, after.version, after.card(), flywheel.root, event="rollback")
    print(f"W&B: alias `champion` moved to {after.version} (run {run}; offline runs: `wandb sync {flywheel.root / 'wandb'}`)")


def cmd_labels_import(args: argparse.Namespace) -> None:
    from transforms.labels import LabelStudioExportError, label_studio_labels
    from transforms.landing import check_batch_id

    source = Path(args.export)
    try:
        labels, problems = label_studio_labels(source)
        name = check_batch_id(args.name or source.stem)
    except (LabelStudioExportError, ValueError) as error:
        raise UserError(str(error)) from None
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    target = _flywheel().labels / f"{name}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    labels.write_parquet(partial)
    partial.replace(target)  # whole or not at all: the landing sensor may read it at any moment
    print(f"wrote {labels.height} label(s) to {target}; {len(problems)} task(s) skipped; the next tick loads them")


def cmd_status(args: argparse.Namespace) -> None:
    from flywheel.summary import print_status

    print_status(_flywheel())


def build_parser() -> argparse.ArgumentParser:
    from transforms.simulate import DRIFT_KINDS

    parser = argparse.ArgumentParser(prog="flywheel", description="A continuous-learning pipeline for image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    land = commands.add_parser("land", help="land your images: an ImageFolder tree, a plain folder, or a CSV/Parquet manifest")
    land.add_argument("source", help="a folder (SOURCE/<class>/<image> or images only) or a .csv/.parquet manifest "
                      "with path_or_uri[, label][, image_id][, captured_at]; URIs are opened with fsspec (s3://, gs://, ...)")
    land.add_argument("--labels", choices=("folders", "manifest", "none"), default=None,
                      help="where labels come from (default: class folders for a folder, the label column of a manifest)")
    land.add_argument("--batch-id", help="batch ids are BATCH_ID-000, -001, ... (default: from the source's name)")
    land.add_argument("--batch-size", type=int, default=1000, help="new images per landing file (default 1000)")
    land.set_defaults(handler=cmd_land)

    simulate = commands.add_parser("simulate", help="write landing batches from the bundled digits dataset")
    simulate.add_argument("--batches", type=int, default=4, help="how many batch files (default 4)")
    simulate.add_argument("--size", type=int, default=None, help="images per batch (default: the pool split evenly)")
    simulate.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32)")
    simulate.add_argument("--drift", choices=DRIFT_KINDS, default="none", help="kind of drift to apply")
    simulate.add_argument("--strength", type=float, default=1.0, help="drift strength in [0, 1] (default 1)")
    simulate.add_argument("--unlabeled", action="store_true", help="leave the label column empty")
    simulate.add_argument("--pool", choices=("main", "holdout", "all"), default="main",
                          help="main: digits for clean batches; holdout: digits no main batch contains")
    simulate.add_argument("--prefix", default="digits", help="batch ids are PREFIX-000, PREFIX-001, ...")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--offset", type=int, default=0, help="skip this many images of the pool (disjoint sets)")
    simulate.add_argument("--overwrite", action="store_true", help="replace landing files that already exist")
    simulate.set_defaults(handler=cmd_simulate)

    run = commands.add_parser("run", help="one tick of the loop: ingest, transform, monitor, retrain if needed")
    run.add_argument("--select", help="materialize this Dagster asset selection instead of a loop tick")
    run.add_argument("--partition", help="batch id to materialize with --select for partitioned assets")
    run.add_argument("--config", help="YAML file of settings per asset, e.g. `trained_model: {epochs: 12}`")
    run.add_argument("--no-wait", action="store_true",
                     help="if another flywheel run is working on this data root, stop instead of queueing behind it")
    run.set_defaults(handler=cmd_run)

    tune = commands.add_parser("tune", help="search the training's hyperparameters with Optuna (the `tune` job)")
    tune.add_argument("--trials", type=int, help="trials to add to the study (default: flywheel.yaml's tuned_hyperparameters, else 12)")
    tune.add_argument("--timeout-minutes", type=float, help="stop starting new trials after this long")
    tune.add_argument("--no-wait", action="store_true", help="if another flywheel run is working on this data root, stop instead of queueing")
    tune.set_defaults(handler=cmd_tune)

    predict = commands.add_parser("predict", help="score landing parquet files or image files with the champion (int8)")
    predict.add_argument("files", nargs="+", help="landing-format .parquet files or .png/.jpg images")
    predict.add_argument("--output", required=True, help="predictions file: .parquet or .csv")
    predict.add_argument("--top-k", type=int, default=1, help="also write the next K-1 guesses (label_2, label_name_2, probability_2, ...)")
    predict.set_defaults(handler=cmd_predict)

    rollback = commands.add_parser("rollback", help="make the previous champion (or --to VERSION) the champion again")
    rollback.add_argument("--to", help="the version to restore, e.g. v0003 (default: the one the champion replaced)")
    rollback.set_defaults(handler=cmd_rollback)

    labels = commands.add_parser("labels", help="labels for images already landed")
    labels_commands = labels.add_subparsers(dest="labels_command", required=True)
    label_import = labels_commands.add_parser(
        "import", help="turn a Label Studio JSON export of a labeling queue into a label file in landing/labels/",
    )
    label_import.add_argument("export", help="the JSON file Label Studio exported (Export -> JSON)")
    label_import.add_argument("--name", help="label file name under landing/labels/ (default: the export's name)")
    label_import.set_defaults(handler=cmd_labels_import)

    status = commands.add_parser("status", help="the champion, its lineage, the versions and the drift history")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Only what every command may raise: the Dagster definitions load with `flywheel run` alone.
    from flywheel.run_lock import RunInProgress
    from orchestration.project import SettingsError
    from training.registry import RegistryError
    from transforms.landing import LandingFileError

    try:
        args.handler(args)
    except (UserError, RunInProgress, RegistryError, LandingFileError, SettingsError, FileNotFoundError) as error:
        print(f"flywheel {args.command}: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
