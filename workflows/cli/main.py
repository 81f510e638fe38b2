"""`vitflow`: the command line. Thin: every command parses its arguments and calls library code.

Heavy imports (torch, ray, mlflow) happen inside the commands so that `vitflow --help` stays fast.
User mistakes end with a one-line error and exit code 2, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from workflows.cli.errors import fail

app = typer.Typer(
    name="vitflow",
    help="Pre-train and fine-tune Vision Transformers as workflow stages on Ray, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

model_app = typer.Typer(help="Inspect the ViT model family.", no_args_is_help=True)
app.add_typer(model_app, name="model")

recipe_app = typer.Typer(help="The named training recipes a pre-training section selects with `recipe: NAME`.",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

# --- shard commands (pipeline) ---
from workflows.cli.shard import shard_app  # noqa: E402  (light: typer and click only)

app.add_typer(shard_app, name="shard")


@model_app.command("describe")
def model_describe(
    variant: str = typer.Argument(..., help="a paper name, SIZE/PATCH: Ti/4, S/16, B/16, L/16, H/14"),
    image_size: int = typer.Option(224, help="input resolution in pixels"),
    num_classes: int = typer.Option(1000, help="classes of the head (0: no head)"),
    depth: int | None = typer.Option(None, help="override the variant's depth"),
) -> None:
    """Print a variant's architecture, parameter count and FLOPs per image."""
    import torch

    from vit import VisionTransformer, decode_variant, gflops

    overrides = {"depth": depth} if depth is not None else {}
    try:
        config = decode_variant(variant, image_size=image_size, num_classes=num_classes, **overrides)
    except ValueError as error:
        fail(str(error))
    with torch.device("meta"):  # shapes only: even H/14 costs no memory
        params = sum(p.numel() for p in VisionTransformer(config).parameters())
    typer.echo(
        f"ViT-{config.variant} @ {config.image_size[0]}x{config.image_size[1]}: embed_dim {config.embed_dim}, "
        f"depth {config.depth}, num_heads {config.num_heads}, mlp_dim {config.mlp_dim}, "
        f"{config.num_patches} patches + [class], {params / 1e6:.1f} M parameters, {gflops(config):.2f} GFLOPs/image"
    )


@recipe_app.command("list")
def recipe_list() -> None:
    """Each recipe: what it sets, and the result its source reports (model, dataset, budget, top-1)."""
    from rich.console import Console
    from rich.table import Table

    from workflows.recipes import load_recipe, recipe_names

    table = Table("recipe", "what it sets", "source's result", title="Training recipes (`vitflow recipe show NAME`)")
    for name in recipe_names():
        recipe = load_recipe(name)
        expected = recipe.expected
        top1 = f"{expected['top1']}% top-1" if expected["top1"] is not None else "no figure checked"
        table.add_row(name, recipe.summary, f"{top1}, {expected['model']} on {expected['dataset']}, {expected['budget']}")
    Console(width=160).print(table)


@recipe_app.command("show")
def recipe_show(name: str = typer.Argument(..., help="a recipe name from `vitflow recipe list`")) -> None:
    """Print a recipe file: its sources, the result they report and every key it sets, with why."""
    from workflows.recipes import RecipeError, load_recipe

    try:
        recipe = load_recipe(name)
    except RecipeError as error:
        fail(f"recipe {error}")
    typer.echo(recipe.text(), nl=False)


def _load_stage_config(path: Path, loader):
    """A stage's YAML configuration, validated; user mistakes end the command with the file and key path."""
    import yaml
    from pydantic import ValidationError

    if not path.is_file():
        fail(f"{path}: no such file")
    try:
        return loader(path)
    except ValidationError as error:
        fail(f"{path}: invalid configuration\n{error}")
    except yaml.YAMLError as error:
        fail(f"{path}: not valid YAML\n{error}")


def _preflight(config: Path | None, dataset_key: str, dataset: str, tracking_key: str, tracking_uri: str | None) -> None:
    """Before a stage command starts Ray or opens a run: its dataset reads and its tracking server answers
    (MLflow's client would retry an unreachable server for minutes)."""
    from vit.data import DataError, read_dataset_index
    from workflows.stages.preflight import PreflightError, check_tracking
    from workflows.tracking import TrackingUnavailable

    where = f"{config}: " if config else ""
    try:
        read_dataset_index(dataset)
    except DataError as error:
        fail(f"{where}{dataset_key}: {error}")
    try:
        if tracking_uri:
            check_tracking(tracking_uri, key=tracking_key)
    except PreflightError as error:
        fail(f"{where}{error}")
    except TrackingUnavailable as error:
        fail(f"{where}{error}", code=3)


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="a workflow spec (YAML)"),
    offline: bool = typer.Option(False, "--offline", help="check the spec alone, not that its corpora exist, its "
                                 "servers answer and its models are registered (e.g. a spec for a cluster)"),
) -> None:
    """Check a workflow spec without running it: unknown keys, wrong types, impossible values; then that its
    corpora exist, its tracking server and Ray cluster answer and the models it names are registered."""
    from workflows.spec import SpecError, load_spec

    try:
        loaded, _ = load_spec(spec)
    except SpecError as error:
        fail(str(error))
    if not offline:
        import os

        from workflows.runner import WorkflowRunner
        from workflows.stages.preflight import PreflightError
        from workflows.tracking import TrackingUnavailable

        try:
            WorkflowRunner(loaded).preflight(ray_address=loaded.ray.address or os.environ.get("RAY_ADDRESS"))
        except PreflightError as error:
            fail(f"{spec}: {error}")
        except TrackingUnavailable as error:
            fail(f"{spec}: {error}", code=3)
    from workflows.runner import training_stages

    stages = [f"preprocess:{name}" for name in loaded.preprocess] + [s.name for s in training_stages(loaded)]
    typer.echo(f"{spec}: valid workflow {loaded.name!r} with stages {', '.join(stages)}")


VERBOSE = typer.Option(False, "--verbose", "-v", help="show Ray's and Tune's own output here (else it goes to a log "
                       "file under the working directory, whose path is printed)")


@app.command()
def run(
    spec: Path = typer.Argument(..., help="a workflow spec (YAML), e.g. workflows/quickstart.yaml"),
    force: list[str] = typer.Option([], "--force", help="rerun this stage even when cached (repeatable)"),
    from_stage: str | None = typer.Option(None, "--from", help="rerun this stage and every stage after it"),
    verbose: bool = VERBOSE,
) -> None:
    """Run a workflow: shard, pre-train, fine-tune and evaluate, on Ray, tracked in MLflow.

    Finished stages whose configuration, inputs and code are unchanged are reused; a killed workflow
    run again continues where it stopped."""
    from workflows.cli.live import WorkflowConsole
    from workflows.compute.local_ray import DriverBusyError
    from workflows.runner import WorkflowRunner
    from workflows.spec import SpecError, load_spec
    from workflows.tracking import TrackingUnavailable

    try:
        loaded, _ = load_spec(spec)
        runner = WorkflowRunner(loaded, force=set(force), from_stage=from_stage)
    except (SpecError, ValueError) as error:
        fail(str(error))
    console = WorkflowConsole(loaded.workdir, name=loaded.name, verbose=verbose)
    runner.on_event = console.event
    runner.search_callbacks = lambda stage, section: [console.search_progress(section, stage)]
    failure = None
    with console:
        try:
            console.summary(runner.run(spec_text=spec.read_text()), f"vitflow ui {spec}")
        except (FileNotFoundError, ValueError, DriverBusyError) as error:
            failure = (f"{spec}: {error}", 1)
        except TrackingUnavailable as error:
            failure = (str(error), 3)
    if failure:
        fail(*failure)


@app.command()
def finetune(
    config: Path = typer.Argument(..., help="a YAML file with the fine-tuning search configuration"),
    parent_run_id: str | None = typer.Option(None, help="nest the search's MLflow run under this run"),
    verbose: bool = VERBOSE,
) -> None:
    """Fine-tune a pre-trained ViT with a Ray Tune search over resolution and learning rate; register the
    best trial as vit-finetuned (alias champion when it beats the current one on the same test split)."""
    from workflows.cli.live import WorkflowConsole
    from workflows.compute.local_ray import DriverBusyError
    from workflows.stages.finetune import load_config, run_finetune

    settings = _load_stage_config(config, load_config)
    _preflight(config, "dataset", settings.dataset, "tracking.uri", settings.tracking.uri)
    console = WorkflowConsole(settings.storage_path, name=settings.name, verbose=verbose)
    search_progress = console.search_progress(settings)
    failure = None
    with console:
        try:
            result = run_finetune(settings, parent_run_id=parent_run_id, callbacks=[search_progress])
        except (FileNotFoundError, ValueError, DriverBusyError) as error:
            failure = f"{config}: {error}"
    if failure:
        fail(failure)
    typer.echo(f"best trial run: {result.best_run_id}; test top-1 {result.test_top1:.4f}")
    if result.version:
        typer.echo(f"registered: models:/{result.registered_name}/{result.version}" + (" (champion)" if result.champion else ""))
    typer.echo(f"trials table: {result.results_table}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="models:/vit-finetuned@champion, models:/NAME/VERSION, runs:/ID/model or a folder"),
    dataset: str = typer.Argument(..., help="a shard folder or object-store prefix written by `vitflow shard`"),
    split: str = typer.Option("test", help="the split to evaluate on"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: ./mlflow.db)"),
    experiment: str = typer.Option("vitflow", help="MLflow experiment of the evaluation run"),
    batch_size: int = typer.Option(64, min=1),
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix on a split, plus the paper's figures of the
    model; logged to MLflow as a child of the model's run."""
    from pydantic import ValidationError

    from workflows.stages.evaluate import EvaluateConfig, run_evaluate

    _preflight(None, "DATASET", str(dataset), "--tracking-uri", tracking_uri)
    try:
        settings = EvaluateConfig(model=model, dataset=str(dataset), split=split, batch_size=batch_size,
                                  tracking={"uri": tracking_uri, "experiment": experiment})
        result = run_evaluate(settings)
    except ValidationError as error:
        fail(str(error))
    except (FileNotFoundError, ValueError, KeyError) as error:
        fail(str(error))
    typer.echo(f"{split}: top-1 {result.top1:.4f}, top-5 {result.top5:.4f} over {result.num_samples} images")
    for name, accuracy in result.per_class_accuracy.items():
        typer.echo(f"  {name:30s} {'-' if accuracy is None else f'{accuracy:.3f}'}")
    typer.echo(f"MLflow run: {result.run_id}")


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="a YAML file with the pre-training configuration"),
    parent_run_id: str | None = typer.Option(None, help="nest the MLflow run under this run"),
    verbose: bool = VERBOSE,
) -> None:
    """Pre-train a ViT on Ray Train from shards; log to MLflow and register it as vit-pretrained.

    Running again with the same `name` resumes an interrupted run from its last checkpoint."""
    from vit.data import check_dataset, read_dataset_index
    from workflows.cli.live import WorkflowConsole
    from workflows.compute.local_ray import DriverBusyError, embedded_ray
    from workflows.stages.pretrain import load_config, run_pretrain

    settings = _load_stage_config(config, load_config)
    _preflight(config, "dataset", settings.dataset, "tracking.uri", settings.tracking.uri)
    try:
        # A dataset that cannot train a classifier is named before Ray starts (the stage checks it too).
        check_dataset(read_dataset_index(settings.dataset), train_split=settings.train_split,
                      eval_splits=[settings.val_split])
    except (FileNotFoundError, ValueError) as error:
        fail(f"{config}: {error}")
    console = WorkflowConsole(settings.storage_path, name=settings.name, verbose=verbose)
    console.training = "pretrain"  # its workers' progress lines are shown
    failure = None
    with console:
        try:
            with embedded_ray(settings.storage_path):
                result = run_pretrain(settings, parent_run_id=parent_run_id)
        except (FileNotFoundError, ValueError, DriverBusyError) as error:
            failure = f"{config}: {error}"
    if failure:
        fail(failure)
    if result.offline:
        fail(f"pre-training finished, but MLflow was unreachable: the model is in {result.offline}; "
             f"upload it with `vitflow upload {result.offline}`", code=3)
    typer.echo(f"model: {result.model_uri}")
    if result.version:
        typer.echo(f"registered: models:/{result.registered_name}/{result.version}")
    for key in ("val/top1", "val/top5", "val/loss"):
        if key in result.metrics:
            typer.echo(f"{key}: {result.metrics[key]:.4f}")


@app.command()
def upload(
    bundle: Path = typer.Argument(..., help="an offline bundle a stage kept when MLflow was unreachable"),
    tracking_uri: str | None = typer.Option(None, help="send it here instead of the tracking URI it was meant for"),
) -> None:
    """Send what a stage kept while the MLflow server was unreachable: its unsent metrics and its model
    (logged to its run and registered). Safe to run again."""
    from workflows.tracking import TrackingUnavailable, upload_offline

    try:
        done = upload_offline(bundle, tracking_uri)
    except (FileNotFoundError, TrackingUnavailable) as error:
        fail(str(error), code=1)
    typer.echo(f"run {done.run_id}: {done.metrics} metrics sent, model {done.model_uri}")
    if done.version:
        typer.echo(f"registered: models:/{done.registered_name}/{done.version}")


# --- cluster commands: Ray Jobs API (workflows.compute.jobs) and the MLflow UI (workflows.compute.ui) ---

DASHBOARD = typer.Option("http://127.0.0.1:8265", "--address", envvar="RAY_API_SERVER_ADDRESS",
                         help="the head's dashboard (Jobs API); 8265 on localhost after `ray dashboard cluster.yaml`")


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="the YAML file the job runs (shipped with the project)"),
    address: str = DASHBOARD,
    command: str = typer.Option("run", "--command", help="the vitflow command the job runs: run (a workflow spec) or pretrain"),
    wait: bool = typer.Option(False, "--wait", help="follow the job's logs; exit with its outcome"),
    ship_project: bool = typer.Option(True, help="ship this checkout's code with the job (else the cluster's installed vitflow runs)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="the job shows Ray's and Tune's own output in its "
                                 "logs (else it keeps them in a log file on the cluster)"),
) -> None:
    """Submit `vitflow COMMAND SPEC` to a Ray cluster through the Jobs API; print the job id."""
    from workflows.compute import jobs

    if not spec.is_file():
        fail(f"{spec}: no such file")
    try:
        entry = jobs.EntryCommand(command)
    except ValueError:
        fail(f"--command {command}: expected one of {', '.join(c.value for c in jobs.EntryCommand)}")
    if entry is jobs.EntryCommand.pretrain:
        _check_pretrain_config(spec)
    else:
        _check_spec_document(spec)
    try:
        client = jobs.connect(address)
        job_id = jobs.submit(client, spec, entry, ship_project=ship_project, verbose=verbose)
    except jobs.ClusterError as error:
        fail(str(error), code=1)
    typer.echo(job_id)
    if wait:
        _follow_to_the_end(client, job_id)


def _check_spec_document(spec: Path) -> None:
    """The spec reads, with every file it extends (the job ships them merged); its values are checked on
    the cluster, where its paths and servers are."""
    from workflows.spec import SpecError, spec_document

    try:
        spec_document(spec)
    except SpecError as error:
        fail(str(error))


def _check_pretrain_config(spec: Path) -> None:
    import yaml
    from pydantic import ValidationError

    from workflows.stages.pretrain import load_config

    try:
        load_config(spec)
    except (ValidationError, yaml.YAMLError) as error:
        fail(f"{spec}: invalid configuration\n{error}")


def _follow_to_the_end(client, job_id: str) -> NoReturn:
    from workflows.compute import jobs

    try:
        state = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the job runs on: vitflow logs {job_id} --follow", err=True)
        raise typer.Exit(130) from None
    except jobs.ClusterError as error:
        fail(str(error), code=1)
    typer.echo(f"job {job_id}: {state.status}" + (f" ({state.message})" if state.status != "SUCCEEDED" and state.message else ""), err=True)
    raise typer.Exit(0 if state.status == "SUCCEEDED" else 1)


@app.command()
def status(job_id: str = typer.Argument(..., help="a job id printed by `vitflow submit`"), address: str = DASHBOARD) -> None:
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from workflows.compute import jobs

    try:
        state = jobs.job_state(jobs.connect(address), job_id)
    except jobs.ClusterError as error:
        fail(str(error), code=1)
    typer.echo(f"{state.job_id}: {state.status}" + (f" ({state.message})" if state.message else ""))


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="a job id printed by `vitflow submit`"),
    address: str = DASHBOARD,
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit with its outcome"),
) -> None:
    """Print a submitted job's logs."""
    from workflows.compute import jobs

    try:
        client = jobs.connect(address)
        if follow:
            _follow_to_the_end(client, job_id)
        typer.echo(jobs.logs(client, job_id), nl=False)
    except jobs.ClusterError as error:
        fail(str(error), code=1)


@app.command()
def ui(
    spec: Path | None = typer.Argument(None, help="a workflow spec: its MLflow store is opened"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="sqlite:///PATH/mlflow.db (default: ./mlflow.db)"),
    artifacts: Path = typer.Option(None, help="the artifact folder (default: mlartifacts next to mlflow.db)"),
    host: str = typer.Option("127.0.0.1", help="bind address; keep localhost and tunnel (ssh -L) to share it"),
    port: int = typer.Option(5000, min=1, max=65535),
) -> None:
    """Start the MLflow UI on a vitflow store (Ctrl-C stops it)."""
    import os

    from workflows.compute import ui as mlflow_ui
    from workflows.tracking import default_tracking_uri

    if spec is not None and tracking_uri is None:
        from workflows.spec import SpecError, load_spec

        try:
            loaded, _ = load_spec(spec)
        except SpecError as error:
            fail(str(error))
        tracking_uri = loaded.tracking.uri or default_tracking_uri(loaded.workdir)
        if not tracking_uri.startswith("sqlite:///"):
            fail(f"{spec}: its tracking URI {tracking_uri} is a server already; open it in a browser")
    uri = tracking_uri or default_tracking_uri()
    try:
        database = mlflow_ui.sqlite_path(uri)
    except ValueError as error:
        fail(str(error))
    if not database.is_file():
        fail(f"{database}: no MLflow store here (run a stage first, or pass --tracking-uri sqlite:///PATH/mlflow.db)")
    folder = artifacts or mlflow_ui.default_artifacts(uri)
    typer.echo(f"MLflow UI on {database} (artifacts: {folder}): http://{host}:{port}", err=True)
    command = mlflow_ui.server_command(uri, folder, host=host, port=port)
    os.execve(command[0], command, mlflow_ui.server_env())  # the server replaces this process: signals reach it


@app.command()
def predict(
    model: str = typer.Argument(..., help="models:/vit-flowers@champion, models:/NAME/VERSION, runs:/ID/model or a folder"),
    source: str = typer.Argument(..., help="an image folder, a Parquet or manifest table, or shards (path or URI)"),
    out: str = typer.Argument(..., help="the Parquet file to write (path or URI): one row per image"),
    batch_size: int | None = typer.Option(None, min=1, help="images per forward pass (default: sized to memory)"),
    actors: int | None = typer.Option(None, min=1, help="model copies (default: one per GPU, else one per CPU)"),
    top_k: int = typer.Option(5, min=1, help="class names and probabilities kept per image"),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it), fp32, bf16, fp16 (CUDA)"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: ./mlflow.db)"),
    experiment: str = typer.Option("vitflow", help="MLflow experiment of the prediction run"),
    address: str | None = typer.Option(None, help="a Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)"),
    workdir: Path = typer.Option(Path("."), help="where a local Ray keeps its state"),
) -> None:
    """Classify every image of SOURCE with a model on Ray Data; bad images get a row with their reason."""
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pipeline.storage import StorageError
    from workflows.compute.local_ray import embedded_ray
    from workflows.configs import PredictConfig
    from workflows.stages.predict import run_predict

    try:
        settings = PredictConfig(model=model, source=source, out=out, batch_size=batch_size, actors=actors,
                                 top_k=top_k, precision=precision,
                                 tracking={"uri": tracking_uri, "experiment": experiment})
    except ValidationError as error:
        fail(str(error))
    try:
        with embedded_ray(workdir, address=address), Progress(
                "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True)) as bar:
            task = bar.add_task("predicting", total=None)
            result = run_predict(settings, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (ValueError, StorageError) as error:
        fail(str(error))
    typer.echo(f"wrote {result.out}: {result.images} rows, {result.bad} bad image(s), with {result.model_uri}")
    typer.echo(f"throughput: {result.images_per_s:.1f} images/s over {result.seconds:.1f} s "
               f"({result.actors} actor(s), batches of {result.batch_size})")
    typer.echo(f"MLflow run: {result.run_id}")


@app.command()
def serve(
    model: str = typer.Argument(..., help="models:/vit-flowers@champion, models:/NAME/VERSION, runs:/ID/model or a folder"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: ./mlflow.db)"),
    replicas: int = typer.Option(1, min=1, help="copies of the model serving requests"),
    max_batch_size: int = typer.Option(16, min=1, help="images classified in one forward pass"),
    batch_wait_ms: float = typer.Option(10.0, min=0, help="how long a request waits for others to join its batch"),
    num_cpus: float = typer.Option(1.0, min=0, help="CPUs per replica"),
    num_gpus: float = typer.Option(0.0, min=0, help="GPUs per replica (classifies on the GPU when > 0)"),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it), fp32, bf16, fp16 (CUDA)"),
    top_k: int = typer.Option(5, min=1, help="classes in a response unless the request asks (?top_k=N)"),
    host: str = typer.Option("127.0.0.1", help="bind address (0.0.0.0 to answer other machines)"),
    port: int = typer.Option(8000, min=1, max=65535),
    route: str = typer.Option("/", help="the URL path it answers on"),
    address: str | None = typer.Option(None, help="a Ray cluster to serve on (default: RAY_ADDRESS, else a local Ray)"),
    workdir: Path = typer.Option(Path("."), help="where a local Ray keeps its state"),
) -> None:
    """Serve a model on Ray Serve: POST an image file's bytes, get its class as JSON. Runs until Ctrl-C."""
    import signal
    import threading

    from workflows.compute import serving
    from workflows.compute.local_ray import embedded_ray
    from workflows.tracking import (
        default_tracking_uri,
        logged_model_config,
        pinned_model_uri,
    )

    uri = tracking_uri or default_tracking_uri()
    try:
        options = serving.ServeOptions(replicas=replicas, max_batch_size=max_batch_size,
                                       batch_wait_timeout_s=batch_wait_ms / 1000, num_cpus=num_cpus, num_gpus=num_gpus,
                                       precision=precision, top_k=top_k, host=host, port=port, route_prefix=route)
        if Path(model).exists():
            model = str(Path(model).resolve())  # a replica's working directory is not this one
        pinned = pinned_model_uri(uri, model)
        logged_model_config(uri, pinned)  # a wrong URI ends here, before Ray starts
    except ValueError as error:
        fail(str(error))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with embedded_ray(workdir, address=address):
        try:
            url = serving.deploy(uri, pinned, options)
            typer.echo(f"serving {pinned} at {url} ({replicas} replica(s), batches of up to {max_batch_size}); "
                       "POST an image file's bytes; Ctrl-C stops", err=True)
            stop.wait()
        finally:
            serving.shutdown()
    typer.echo("stopped", err=True)


@app.command()
def export(
    model: str = typer.Argument(..., help="models:/vit-flowers@champion, models:/NAME/VERSION, runs:/ID/model or a folder"),
    out: str = typer.Argument(..., help="the file to write: a local path or an object-store URI (s3://bucket/vit.onnx)"),
    fmt: str = typer.Option(..., "--format", help="onnx (needs the extra: pip install 'vitflow[onnx]')"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: ./mlflow.db)"),
    opset: int = typer.Option(18, min=17, help="the ONNX opset"),
) -> None:
    """Export a model for other runtimes, checked against PyTorch (logits to 1e-4 at batch 1 and 3).

    The ONNX file takes preprocessed (N, 3, S, S) images and returns (N, K) logits; its metadata holds the
    class names, the preprocessing and the ViT's configuration."""
    from pipeline.storage import Location, StorageError
    from vit import VisionTransformer
    from vit.export import check_onnx, export_onnx
    from workflows.tracking import default_tracking_uri, load_plain_model

    if fmt != "onnx":
        fail(f"--format must be onnx, got {fmt!r}")
    uri = tracking_uri or default_tracking_uri()
    try:
        target = Location(out)
        if target.is_dir():
            fail(f"{out}: is a folder; give the file to write (e.g. {out.rstrip('/')}/model.onnx)")
        plain = load_plain_model(uri, model)
        vit_model = VisionTransformer(plain.config)
        vit_model.load_state_dict(plain.state_dict)
        with target.writing() as scratch:  # published whole, and only once the check has passed
            written = export_onnx(vit_model, plain.class_names, plain.preprocessing, scratch, opset=opset)
            worst = check_onnx(vit_model, written)
            size = written.stat().st_size
    except (ValueError, ImportError, StorageError) as error:
        fail(str(error))
    typer.echo(f"wrote {out} ({size / 1e6:.1f} MB, ONNX opset {opset}): logits match PyTorch's to {worst:.1e} "
               f"(onnxruntime, batches of 1 and 3)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
