"""Executors: the only module that knows Ray.

Both executors offer the same two operations the stages need:
  map(fn, items, ...)        one task per unit of work (a shard); results in input order
  stream(items, ...)         the embedding stream: read -> preprocess (CPU tasks) -> model (actor
                             pool) -> batches back to the driver as they finish
`LocalExecutor` runs them in this process, tasks side by side in threads (one machine, no Ray
start-up; tests, benchmarks); `RayExecutor` runs them on an
embedded local Ray (bound to 127.0.0.1) or on the cluster at `address`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from tqdm import tqdm

from . import procs
from .config import RayConfig


class ShardFailed(RuntimeError):
    """A unit of work kept failing after its retries; rerunning the same command is safe."""


class LocalExecutor:
    """Units of work in this process: `workers` threads (default: one per core) run tasks side by
    side, each task with `num_cpus` BLAS / OpenMP threads, as Ray would run them (one core per
    task). Measured on 2 cores, the search stage's join at 1 M rows: 24.8 s one task at a time with
    two BLAS threads, 14.1 s two tasks with one each (the join is gathers, masks and small products;
    bench/results/ab.md). A lone task keeps every core."""
    kind = "local"

    def __init__(self, workers: int = 0):
        self.workers = workers or os.cpu_count() or 1

    def map(self, fn: Callable, items: list, desc: str = "", num_cpus: float = 1, threads: int = 0) -> list:
        """Every item is tried (one failure does not stop the others); failures are raised at the end.
        Results in input order."""
        width = max(1, min(len(items), int(self.workers // max(num_cpus, 1))))
        results: list = [None] * len(items)
        failed = []
        with tqdm(total=len(items), desc=desc, disable=not desc, leave=False) as bar:
            if width == 1:
                for k, item in enumerate(items):
                    results[k] = _attempt(fn, item)
                    bar.update(1)
            else:
                from concurrent.futures import ThreadPoolExecutor, as_completed
                from threadpoolctl import threadpool_limits
                per_task = threads or max(1, int(num_cpus))
                with threadpool_limits(per_task, user_api="blas"), \
                        ThreadPoolExecutor(width, initializer=_omp_threads, initargs=(per_task,)) as pool:
                    futures = {pool.submit(_attempt, fn, item): k for k, item in enumerate(items)}
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update(1)
        out = []
        for item, (ok, value) in zip(items, results):
            if ok:
                out.append(value)
            else:
                failed.append((item, value))
        if failed:
            raise ShardFailed(_failure_message(desc or fn.__name__, failed, 0)) from failed[0][1]
        return out

    def stream(self, items: list, read: Callable, preprocess: Callable, model_cls: type,
               model_args: tuple, batch_size: int, **_: Any) -> Iterator[dict]:
        model = model_cls(*model_args)
        buf: list[dict] = []
        for item in items:
            for row in read(item):
                buf.append(row)
                if len(buf) == batch_size:
                    yield model(preprocess(_columns(buf)))
                    buf = []
        if buf:
            yield model(preprocess(_columns(buf)))

    def shutdown(self) -> None:
        pass


def _attempt(fn: Callable, item) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except Exception as exc:  # collected and re-raised by map with the unit named
        return False, exc


def _omp_threads(n: int) -> None:
    """OpenMP's thread count is per calling thread: set it in each worker thread (FAISS)."""
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def _columns(rows: list[dict]) -> dict:
    import numpy as np
    return {k: np.array([r[k] for r in rows], dtype=object if k == "data" else None) for k in rows[0]}


class RayExecutor:
    kind = "ray"

    def __init__(self, cfg: RayConfig | None = None):
        self.cfg = cfg or RayConfig()
        self._started = False
        self._guard = None
        # which node ran each shard task: {desc: {node_id: tasks}}; on_task(desc, done, total, node_id)
        # is called as each task finishes (a job's progress lines)
        self.tasks_by_node: dict[str, dict[str, int]] = {}
        self.on_task: Callable[[str, int, int, str], None] | None = None
        self._start()

    def _start(self) -> None:
        import ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "NO_ALBUMENTATIONS_UPDATE": "1",
                            "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}}
        if self.cfg.address:
            ray.init(address=self.cfg.address, log_to_driver=False, runtime_env=env)
        else:
            # address="local": always a fresh embedded instance, never a cluster started on this machine;
            # its processes end with this one, however it ends (procs.guard)
            self._guard = procs.start_guard()
            with _loopback_only():
                ray.init(address="local", num_cpus=self.cfg.num_cpus or os.cpu_count(), include_dashboard=False,
                         runtime_env=env,
                         object_store_memory=self.cfg.object_store_mb * 1024 * 1024,
                         _node_ip_address="127.0.0.1", log_to_driver=False,
                         configure_logging=True, logging_level="warning")
            procs.guard_add(self._guard, _ray_pids())
        self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

    def node_names(self) -> dict[str, str]:
        """Node id -> a readable name: the node's own resource label (`node_b`), else `head`, else the
        id's first 8 characters."""
        import ray
        plain = {"CPU", "GPU", "memory", "object_store_memory"}
        names = {}
        for node in ray.nodes():
            res = node.get("Resources", {})
            labels = sorted(k for k in res if k not in plain and not k.startswith(("node:", "accelerator_type:")))
            head = "node:__internal_head__" in res
            names[node["NodeID"]] = labels[0] if labels else "head" if head else node["NodeID"][:8]
        return names

    @property
    def num_gpus(self) -> int:
        import ray
        return int(ray.cluster_resources().get("GPU", 0))

    def map(self, fn: Callable, items: list, desc: str = "", num_cpus: float = 1, threads: int = 0) -> list:
        import ray
        env = {"OMP_NUM_THREADS": str(threads or max(1, int(num_cpus)))}
        remote = ray.remote(_call_with_env).options(num_cpus=num_cpus, max_retries=self.cfg.max_retries,
                                                     retry_exceptions=True)
        refs = [remote.remote(fn, item, env) for item in items]
        pending = list(refs)
        nodes = self.tasks_by_node.setdefault(desc or fn.__name__, {})
        with tqdm(total=len(refs), desc=desc, disable=not desc or self.on_task is not None, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
                try:
                    node = ray.get(done[0])[0]
                except Exception:  # a failed task: named at the end
                    node = "failed"
                nodes[node] = nodes.get(node, 0) + 1
                if self.on_task:
                    self.on_task(desc or fn.__name__, len(refs) - len(pending), len(refs), node)
        out, failed = [], []
        for item, ref in zip(items, refs):
            try:
                out.append(ray.get(ref)[1])
            except Exception as exc:  # the task's own error, after its retries
                failed.append((item, exc))
        if failed:
            raise ShardFailed(_failure_message(desc or fn.__name__, failed, self.cfg.max_retries)) from failed[0][1]
        return out

    def stream(self, items: list, read: Callable, preprocess: Callable, model_cls: type,
               model_args: tuple, batch_size: int, actors: int = 1, decode_cpus: float = 0.5,
               model_cpus: float = 1.0) -> Iterator[dict]:
        import ray
        gpus = 1 if self.num_gpus > 0 else 0   # ask for GPUs only where the cluster has them
        if not gpus:   # CPU model actors must leave room for the decode tasks, or the stream stalls
            cpus = float(ray.cluster_resources().get("CPU", 1))
            model_cpus = min(model_cpus, max(0.1, (cpus - 2 * decode_cpus) / max(actors, 1)))
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.flat_map(read, num_cpus=decode_cpus)
        ds = ds.map_batches(preprocess, batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus)
        ds = ds.map_batches(model_cls, fn_constructor_args=model_args, batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=0 if gpus else model_cpus, num_gpus=gpus)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    def node_counts(self) -> dict[str, int]:
        """Shard tasks per node (by readable name) since the last call: the driver adds them to
        each stage's stats (`tasks_by_node`)."""
        names = self.node_names() if self.tasks_by_node else {}
        out: dict[str, int] = {}
        for counts in self.tasks_by_node.values():
            for node, n in counts.items():
                out[names.get(node, node)] = out.get(names.get(node, node), 0) + n
        self.tasks_by_node = {}
        return out

    def shutdown(self) -> None:
        import ray
        if self._started and ray.is_initialized():
            ray.shutdown()
        if self._guard is not None:       # it stops what the shutdown left, then exits
            self._guard.stdin.close()
            self._guard.wait(timeout=30)
            self._guard = None


def _ray_pids() -> list[int]:
    """The processes an embedded ray.init started (GCS, raylet, monitors), as Ray recorded them."""
    import ray
    node = getattr(ray._private.worker, "_global_node", None)   # None: the guard follows the driver's new children
    return [info.process.pid for infos in getattr(node, "all_processes", {}).values() for info in infos]


@contextmanager
def _loopback_only():
    """While an embedded Ray starts: its node address is 127.0.0.1, so the GCS, raylet, workers,
    agents and metrics exporters listen on loopback only. Ray maps a `_node_ip_address` of
    127.0.0.1 to the machine's outward address unless its single-node switch (the one it uses on
    macOS and Windows) is set: set here for this process and the processes it starts, then put back."""
    import ray._private.ray_constants as constants
    key = constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before_flag = os.environ.get(key), constants.ENABLE_RAY_CLUSTER
    os.environ[key], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before_env


def _unit_name(item: Any) -> str:
    if isinstance(item, dict):
        for key in ("name", "shard", "index", "tar"):
            if key in item:
                return f"{key} {item[key]}"
    if isinstance(item, tuple):
        return " ".join(str(x) for x in item[1:])
    return str(item)[:80]


def _failure_message(desc: str, failed: list, retries: int) -> str:
    lines = [f"{desc}: {len(failed)} unit(s) failed after {retries} retries; the others finished and "
             "are kept. Rerunning the same command is safe: it redoes only what is missing."]
    lines += [f"  {_unit_name(item)}: {type(exc).__name__}: {exc}" for item, exc in failed[:20]]
    return "\n".join(lines)


def _call_with_env(fn: Callable, item: Any, env: dict) -> tuple[str, Any]:
    """Runs one unit; returns (id of the node it ran on, its result)."""
    import ray
    os.environ.update(env)
    try:
        import faiss
        faiss.omp_set_num_threads(int(env["OMP_NUM_THREADS"]))
    except ImportError:
        pass
    return ray.get_runtime_context().get_node_id(), fn(item)


def make_executor(kind: str, cfg: RayConfig | None = None):
    if kind == "local":
        return LocalExecutor(cfg.num_cpus if cfg else 0)
    if kind == "ray":
        return RayExecutor(cfg)
    raise ValueError(f"executor {kind!r}: expected 'ray' or 'local'")


@contextmanager
def open_executor(kind: str, cfg: RayConfig | None = None):
    """An executor of `kind` for the length of a block, shut down at its end (error or not)."""
    ex = make_executor(kind, cfg)
    try:
        yield ex
    finally:
        ex.shutdown()

