"""Task runners of the flows that render (dataset, evaluate): one thread, or a Dask cluster (local worker processes,
one per GPU, or an existing scheduler). Models are loaded once per worker process; tasks get plain configs."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner


def task_runner(args):
    """The Prefect task runner a command's --task-runner / --dask-address / --dask-workers ask for."""
    if getattr(args, "task_runner", "thread") == "dask":
        from prefect_dask import DaskTaskRunner

        if getattr(args, "dask_address", None):   # an existing cluster; on GPUs its workers need `--nthreads 1 --resources GPU=1`
            return DaskTaskRunner(address=args.dask_address)
        import torch

        gpus = torch.cuda.device_count()
        # Each worker process loads the models once; one thread per worker (pipelines are not thread-safe).
        # With GPUs: one worker per GPU, each declaring the resource shard tasks ask for (see gpu_annotation).
        kwargs = {"n_workers": getattr(args, "dask_workers", None) or gpus or 2, "threads_per_worker": 1, "processes": True}
        if gpus:
            kwargs["resources"] = {"GPU": 1}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    return ThreadPoolTaskRunner(max_workers=1)


def gpu_annotation(device: str):
    """Under a Dask runner with CUDA renders, each task submitted inside asks for the Dask resource GPU=1 (one task per
    GPU at a time)."""
    from contextlib import nullcontext

    from prefect.context import FlowRunContext

    runner = FlowRunContext.get().task_runner
    if type(runner).__name__ != "DaskTaskRunner":
        return nullcontext()
    from livo_core.models import resolve_device

    if resolve_device(device).type != "cuda":
        return nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})   # Dask workers must declare --resources GPU=1 (see task_runner)
