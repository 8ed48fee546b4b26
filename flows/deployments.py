"""`livo deploy`: the livo deployments on the configured Prefect API (a `prefect server` or Prefect Cloud).

    livo deploy [--work-pool livo] [--nightly-cron "0 3 * * *"] [--timezone UTC] [--root runs/nightly]
    livo deploy --serve           # no work pool: this process serves the deployments and runs them
    livo deploy --prefect-yaml prefect.yaml    # what prefect.yaml declares (like `prefect deploy --all`)

Deployments (flow name / deployment name):
  livo-dataset/dataset        build or finish a dataset run (parameters: config, run_dir)
  livo-train/training         train a value encoder on dataset runs
  livo-heldout/heldout        score a registry version on the nightly's held-out set (root, version)
  livo-evaluate/evaluate      the paper's evaluation of value encoders on renders (config, out_dir)
  livo-nightly/nightly        the nightly loop (root, config_file, overrides); cron "0 3 * * *" UTC

With a work pool, runs wait until a worker of that pool picks them up (`prefect worker start --pool livo`).
A missing pool is created as a `process` pool: its worker runs each flow run as a subprocess on its own
machine, in the project folder. For GPU machines, see docs/operations.md (one pool per machine kind).
Deployments load their flows by module path (flows.nightly.nightly_flow), so a worker needs livo installed.
"""

from __future__ import annotations

from pathlib import Path

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from livo_core.errors import LivoError
from pathlib import Path as _Path

PROJECT_DIR = _Path(__file__).resolve().parent.parent   # where `flows` is importable from (a process worker's working_dir)

DEFAULT_CRON = "0 3 * * *"
DEFAULT_POOL = "livo"


def _training_flow():
    """The training flow (flows/training.py), when that module provides one."""
    try:
        from flows import training
    except ImportError:
        return None
    return getattr(training, "train_flow", None) or getattr(training, "train_value_encoder", None)


def build_deployments(root: str, cron: str = DEFAULT_CRON, timezone: str = "UTC", work_pool: str | None = None,
                      job_variables: dict | None = None, config_file: str | None = None) -> list:
    """RunnerDeployment objects for every livo flow (nothing is sent to the API yet)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    from flows.dataset import dataset_flow
    from flows.evaluation import evaluation_flow
    from flows.nightly import heldout_flow, nightly_flow
    from livo_core.config import RunConfig

    root = str(Path(root).resolve())   # a worker runs flows elsewhere: give it absolute paths
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=work_pool, job_variables=job_variables or {},
                  tags=["livo"])
    deployments = [
        dataset_flow.to_deployment(name="dataset", description="Build or finish a livo dataset run (renders take the gpu tag).",
                                   parameters={"config": RunConfig().model_dump(mode="json"),
                                               "run_dir": str(Path("runs/dataset").resolve())}, **common),
        heldout_flow.to_deployment(name="heldout", description="Held-out metrics of a registry version (default: production).",
                                    parameters={"root": root}, **common),
        evaluation_flow.to_deployment(name="evaluate", description="The paper's evaluation of value encoders on renders (livo evaluate).",
                                      parameters={"config": {}, "out_dir": str(Path("runs/eval").resolve())}, **common),
        nightly_flow.to_deployment(name="nightly", description="New data -> train -> evaluate -> promote if not worse.",
                                   schedule=CronSchedule(cron=cron, timezone=timezone), concurrency_limit=1,
                                   parameters={"root": root, "config_file": config_file}, **common),
    ]
    train = _training_flow()
    if train is not None:
        deployments.insert(1, train.to_deployment(
            name="training", description="Train a value encoder on dataset runs.",
            parameters={"data_dirs": [str(Path("runs/dataset").resolve())], "out_dir": str(Path("runs/train").resolve()),
                        "train_config": {}}, **common))
    return deployments


def _check_api() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LivoError("no Prefect API is configured: start one (`prefect server start`) and set PREFECT_API_URL, "
                        "e.g. `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    return url


def ensure_work_pool(name: str) -> str:
    """The pool's type; a missing pool is created as a `process` pool."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return "process"


def deploy(root: str, work_pool: str = DEFAULT_POOL, cron: str = DEFAULT_CRON, timezone: str = "UTC",
           config_file: str | None = None) -> dict[str, str]:
    """Create or update the deployments on the Prefect API; returns {"flow/deployment": id}."""
    url = _check_api()
    try:
        pool_type = ensure_work_pool(work_pool)
    except Exception as e:  # connection refused, wrong URL, auth
        raise LivoError(f"cannot reach the Prefect API at {url} ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
                        "is `prefect server start` running there?") from None
    # A process worker runs each flow in this project's folder (else Prefect picks a temporary one).
    job_variables = {"working_dir": str(PROJECT_DIR)} if pool_type == "process" else {}
    deployments = build_deployments(root, cron, timezone, work_pool, job_variables, config_file)
    # RunnerDeployment.apply is what prefect.deploy does per deployment, minus its image and worker checks
    # (which, in prefect 3.8.8 against its own server, fail with a 422 on the workers query).
    return {f"{d.flow_name}/{d.name}": str(d.apply(work_pool_name=work_pool)) for d in deployments}


def deploy_from_yaml(path: Path) -> dict[str, str]:
    """Create the deployments a prefect.yaml declares (name, entrypoint, parameters, schedules, work pool,
    tags, concurrency limit) on the Prefect API; returns {"flow/deployment": id}.

    Equivalent to `prefect deploy --all` for livo's flows, which in prefect 3.8.8 against its own server
    stops after the first deployment (a 422 on the workers query it makes to print its hints).
    Relative paths in parameters stay relative: flow runs work in the yaml's folder.
    """
    import importlib

    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    url = _check_api()
    project = path.resolve().parent
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    ids = {}
    for d in spec.get("deployments") or []:
        file, _, name = d["entrypoint"].partition(":")
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        pool = d.get("work_pool") or {}
        variables = dict(pool.get("job_variables") or {})
        if pool.get("name"):
            try:
                pool_type = ensure_work_pool(pool["name"])
            except Exception as e:  # connection refused, wrong URL, auth
                raise LivoError(f"cannot reach the Prefect API at {url} ({type(e).__name__}): is `prefect server start` running there?") from None
            if pool_type == "process":
                variables.setdefault("working_dir", str(project))
        schedules = [CronSchedule(cron=x["cron"], timezone=x.get("timezone") or "UTC") for x in d.get("schedules") or []]
        paused = any(x.get("active") is False for x in d.get("schedules") or [])
        deployment = getattr(module, name).to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags"), parameters=d.get("parameters") or {},
            schedules=schedules or None, paused=paused or None, concurrency_limit=d.get("concurrency_limit"),
            work_pool_name=pool.get("name"), work_queue_name=pool.get("work_queue_name"), job_variables=variables,
            entrypoint_type=EntrypointType.MODULE_PATH)
        ids[f"{deployment.flow_name}/{deployment.name}"] = str(deployment.apply(work_pool_name=pool.get("name")))
    if not ids:
        raise LivoError(f"{path} declares no deployments under `deployments:`")
    return ids


def cli_deploy(args) -> int:
    if getattr(args, "prefect_yaml", None):
        path = Path(args.prefect_yaml)
        if not path.is_file():
            raise LivoError(f"--prefect-yaml {path} not found: pass the prefect.yaml at the project root")
        ids = deploy_from_yaml(path)
    elif args.serve:
        from prefect import serve

        _check_api()
        deployments = build_deployments(args.root, args.nightly_cron, args.timezone, config_file=args.nightly_config)
        print(f"livo: serving {', '.join(f'{d.flow_name}/{d.name}' for d in deployments)} "
              "(Ctrl-C stops; this process runs them)")
        serve(*deployments)
        return 0
    else:
        ids = deploy(args.root, args.work_pool, args.nightly_cron, args.timezone, args.nightly_config)
    for name, i in ids.items():
        print(f"livo: deployment {name} ({i})")
    if not getattr(args, "prefect_yaml", None):
        print(f"livo: nightly runs at cron {args.nightly_cron!r} ({args.timezone}); start a worker to run them: "
              f"prefect worker start --pool {args.work_pool}")
    return 0
