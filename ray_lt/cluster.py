"""Ray's plumbing in one place: connecting to (or starting) the cluster, what the connected
cluster can hold, refusing what it never could, and every private Ray API ray_lt touches.

What the cluster can hold: its nodes now and, on a cluster with an autoscaler,
the node types it may add (a ``ray up`` cluster ships every worker type with
``min_workers: 0``, so a run often starts on the head node alone).

The node types come from the autoscaler's config: ``ray.autoscaler_config`` when set, else the
config the cluster reported to its GCS (KubeRay, autoscaler v2), else the one the head node's
autoscaler monitor was started with (``ray start --head --autoscaling-config``, which ``ray
up`` runs; readable when the driver runs on the head node, as ``ray job submit`` does).
``check_cluster_resources`` refuses only what no node could ever hold, and the
sampler pool asks the autoscaler for what the config says (``request_pool``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from ray_lt.config import Config, Pool, RayConfig
from ray_lt.errors import ClusterError, ConfigError
from ray_lt.log import verbose

log = logging.getLogger(__name__)

HEAD_MARKER = "node:__internal_head__"  # a resource only the head node has


@dataclass
class NodeType:
    """One worker node type of an autoscaler config."""

    name: str
    resources: dict[str, float]
    max_workers: int


@dataclass
class Capacity:
    """The cluster's resources now (``now``), the most it can grow to (``most``: the head
    and every node type at its ``max_workers``), and the resources of each node it has or may
    add (``nodes``), which a single actor or worker must fit on."""

    now: dict[str, float]
    most: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)
    node_types: list[NodeType] = field(default_factory=list)
    source: str = ""

    @property
    def autoscaling(self) -> bool:
        return bool(self.node_types)

    def describe(self) -> str:
        cpus, gpus = self.most.get("CPU", 0.0), self.most.get("GPU", 0.0)
        if not self.autoscaling:
            return f"the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s)"
        types = ", ".join(f"{t.name} x{t.max_workers} ({_shown(t.resources)})"
                          for t in self.node_types)
        return (f"the Ray cluster can grow to {cpus:g} CPU(s) and {gpus:g} GPU(s) (now "
                f"{self.now.get('CPU', 0.0):g} and {self.now.get('GPU', 0.0):g}; node types "
                f"of {self.source}: {types})")

    def fits_one_node(self, demand: dict[str, float]) -> bool:
        """Whether one node, existing or of a node type, can hold ``demand``."""
        wanted = {k: v for k, v in demand.items() if v > 0}
        return any(all(node.get(k, 0.0) >= v for k, v in wanted.items()) for node in self.nodes)


def _shown(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items() if k in ("CPU", "GPU")) or "-"


def node_types_from_config(config: dict[str, Any], source: str) -> list[NodeType]:
    """The worker node types of an autoscaler config (``available_node_types``, the head's
    own type left out); a type without ``resources`` is skipped (the autoscaler reads them
    from the cloud, which cannot be done here)."""
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        raise ConfigError(f"{source}: an autoscaler config has available_node_types; this one "
                          f"does not")
    head = config.get("head_node_type")
    found = []
    for name, spec in types.items():
        if name == head or not isinstance(spec, dict) or not spec.get("resources"):
            continue
        found.append(NodeType(name, {k: float(v) for k, v in spec["resources"].items()},
                              int(spec.get("max_workers", config.get("max_workers", 0)))))
    return found


def read_autoscaler_config(path: str | Path) -> dict[str, Any]:
    """An autoscaler config file (YAML or JSON, which YAML reads too)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ray.autoscaler_config: {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"ray.autoscaler_config: {path} is not YAML: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"ray.autoscaler_config: {path} is not a mapping")
    return config


def _gcs_node_types() -> list[NodeType]:
    """The node groups the cluster reported to its GCS (KubeRay, autoscaler v2), if any."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: a client connection or another Ray version lacks it
        return []
    if config is None:
        return []
    return [NodeType(g.name or f"group{i}", {k: float(v) for k, v in g.resources.items()},
                     int(g.max_count) if g.max_count >= 0 else 0)
            for i, g in enumerate(config.node_group_configs) if g.resources]


def _monitor_config_path() -> Path | None:
    """The ``--autoscaling-config`` of this cluster's autoscaler monitor, when it runs on this
    machine (the driver on the head node)."""
    try:
        import psutil

        gcs = ray.get_runtime_context().gcs_address
    except Exception:
        return None
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info.get("cmdline") or [])
        if "monitor" not in line or "--autoscaling-config" not in line:
            continue
        if f"--gcs-address={gcs}" not in line and f"--gcs-address {gcs}" not in line:
            continue
        match = re.search(r"--autoscaling-config[= ](\S+)", line)
        if match:
            return Path(match.group(1)).expanduser()
    return None


def autoscaler_node_types(configured: str | None) -> tuple[list[NodeType], str]:
    """The worker node types the cluster's autoscaler may add, and where they were read."""
    if configured:
        return node_types_from_config(read_autoscaler_config(configured), configured), \
            f"ray.autoscaler_config {configured}"
    types = _gcs_node_types()
    if types:
        return types, "the cluster's reported config"
    path = _monitor_config_path()
    if path is not None and path.is_file():
        with contextlib.suppress(ConfigError):
            return node_types_from_config(read_autoscaler_config(path), str(path)), \
                f"the autoscaler's config {path}"
    return [], ""


def cluster_capacity(autoscaler_config: str | None = None) -> Capacity:
    """What the connected cluster has now and can grow to (see the module's docstring)."""
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    alive = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes()
             if n.get("Alive")]
    types, source = autoscaler_node_types(autoscaler_config)
    most = dict(now)
    if types:
        head = next((n for n in alive if HEAD_MARKER in n), {})
        grown: dict[str, float] = dict(head)
        for t in types:
            for key, value in t.resources.items():
                grown[key] = grown.get(key, 0.0) + value * t.max_workers
        most = {k: max(now.get(k, 0.0), grown.get(k, 0.0)) for k in set(now) | set(grown)}
    nodes = alive + [t.resources for t in types if t.max_workers > 0]
    return Capacity(now, most, nodes, types, source)


def request_pool(bundles: list[dict[str, float]], capacity: Capacity) -> None:
    """Ask the autoscaler for ``bundles`` at once (a pool about to start), so that it adds
    the nodes they need instead of waiting for the pool's demand; an empty list withdraws the
    request, letting idle nodes go. Nothing happens on a cluster without an autoscaler."""
    if not capacity.autoscaling:
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[{k: v for k, v in b.items() if v > 0} for b in bundles])
    except Exception as err:  # the request only speeds scaling up: never fail a run over it
        log.warning(f"could not ask the autoscaler for the pool's nodes: {err}")


# -- connecting ---------------------------------------------------------------------------

def _reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def ray_address(configured: str | None) -> str | None:
    """Where ``ray.init`` should connect: ``ray.address``, else RAY_ADDRESS (``ray job submit``
    sets it), else the cluster last started on this machine if it is still alive, else
    ``"local"`` (start Ray here).

    Left to itself ``ray.init()`` also tries the last cluster started on this machine, and
    when that cluster is gone it retries for minutes before failing.
    """
    if configured or os.environ.get("RAY_ADDRESS"):
        return configured
    from ray._private.utils import read_ray_address

    last = read_ray_address()
    return last if last and _reachable(last) else "local"


def init_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, to RAY_ADDRESS (ray job submit), or start Ray here;
    a cluster that cannot be reached or started is a ClusterError saying where and why.

    Unless verbose (``--verbose``), the workers' output and Ray's INFO lines stay in Ray's
    session logs and Ray Data shows no per-dataset progress bars (see ``ray_lt.log``).
    """
    loud = verbose()
    if not ray.is_initialized():
        address = ray_address(cfg.address)
        if address not in (None, "local", "auto") and not address.startswith("ray://") \
                and not _reachable(address, timeout=5.0):  # ray.init would retry for minutes
            raise ClusterError(ray_start_failure(address, cfg.address, ConnectionError(
                f"nothing answers at {address}")))
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=loud,
                     logging_level=logging.INFO if loud else logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
        except Exception as err:  # Ray raises ConnectionError, RuntimeError or plain Exception
            ray.shutdown()  # stop what a half-started local cluster left running
            raise ClusterError(ray_start_failure(address, cfg.address, err)) from err
    ray.data.DataContext.get_current().enable_progress_bars = loud


def ray_start_failure(address: str | None, configured: str | None, err: Exception) -> str:
    """What failed when ``ray.init`` raised ``err``, and what to try."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if address == "local":
        return (f"Ray could not start a local cluster on this machine: {reason}. On a busy "
                f"machine Ray's processes can time out while starting: try again when it is "
                f"less loaded, or start one with `ray start --head` and set ray.address")
    where = (f"ray.address {configured!r}" if configured
             else f"RAY_ADDRESS {os.environ.get('RAY_ADDRESS', address)!r}")
    lowered = reason.lower()
    if "token" in lowered or "auth" in lowered or "unauthenticated" in lowered:
        hint = ("the cluster refused this machine's authentication token: use that cluster's "
                "token (`ray get-auth-token` on its head node, then RAY_AUTH_TOKEN)")
    else:
        hint = ("check the address (`ray status` on the head node prints it) and that the "
                "cluster is up and reachable from here")
    return f"{where}: could not connect to the Ray cluster: {reason}; {hint}"


# -- what the cluster can run ---------------------------------------------------------------

DATA_TASK_CPUS = 1.0  # what a Ray Data read or map task asks for unless told otherwise


def check_cluster_resources(cfg: Config, capacity: Capacity | dict[str, float],
                            needs: tuple[str, ...]) -> None:
    """Refuse settings that the cluster (``ray_lt.cluster.cluster_capacity``: its nodes and
    what its autoscaler may add; a plain dict of resources is a fixed cluster) can never
    schedule, which would otherwise wait for them forever with every process idle.

    ``needs`` names what the command runs: ``train`` (Ray Train workers, which must leave
    Ray Data a CPU for its read and map tasks), ``synthesis`` (the sampler actor pool, the grid
    task) and ``tune`` (each trial's driver beside its Train workers); the evaluation actor
    pool is always checked. A worker or actor must also fit on one node.
    """
    if not isinstance(capacity, Capacity):
        capacity = Capacity(dict(capacity), dict(capacity))
    resources = capacity.most
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    has = capacity.describe()
    problems = []

    def one_node(key: str, what: str, demand: dict[str, float]) -> None:
        if capacity.nodes and not capacity.fits_one_node(demand):
            shown = ", ".join(f"{v:g} {k}" for k, v in demand.items() if v > 0)
            problems.append(f"{key}: {what} needs {shown} on one node, but no node "
                            f"{'or node type ' if capacity.autoscaling else ''}of the cluster "
                            f"has that much ({has}); lower {key}")

    def pool(section: str, spec: Pool) -> None:
        size, cpus_each, gpus_each = spec.size, spec.cpus, spec.gpus
        if size * cpus_each > cpus:
            problems.append(f"{section}.cpus_per_actor: {size} actor(s) x {cpus_each:g} CPU = "
                            f"{size * cpus_each:g} CPUs, but {has}; lower {section}.num_actors "
                            f"or {section}.cpus_per_actor")
        if gpus_each > 0 and size * gpus_each > gpus:
            problems.append(f"{section}.gpus_per_actor: {size} actor(s) x {gpus_each:g} GPU = "
                            f"{size * gpus_each:g} GPUs, but {has}; lower {section}.num_actors "
                            f"or set {section}.gpus_per_actor: 0")
        one_node(f"{section}.cpus_per_actor", f"one {section} actor",
                 {"CPU": cpus_each, "GPU": gpus_each})

    sc = cfg.scaling
    if "train" in needs:
        if sc.use_gpu and sc.num_workers * sc.gpus_per_worker > gpus:
            problems.append(f"scaling.use_gpu: true asks for {sc.num_workers} worker(s) x "
                            f"{sc.gpus_per_worker:g} GPU (scaling.gpus_per_worker), but {has}; "
                            f"set scaling.use_gpu: false or connect to a cluster with GPUs "
                            f"(ray.address)")
        trial = cfg.tune.trial_cpus if "tune" in needs else 0.0
        held = sc.num_workers * sc.cpus_per_worker + trial
        if held + DATA_TASK_CPUS > cpus:
            beside = f" + tune.trial_cpus {trial:g}" if trial else ""
            problems.append(f"scaling.cpus_per_worker: {sc.num_workers} worker(s) x "
                            f"{sc.cpus_per_worker:g} CPU{beside} = {held:g} CPUs leave Ray Data "
                            f"{max(cpus - held, 0):g} of the cluster's CPUs, and each of its "
                            f"tasks needs {DATA_TASK_CPUS:g}: training would wait forever; "
                            f"{has}; lower scaling.cpus_per_worker or scaling.num_workers")
        one_node("scaling.cpus_per_worker", "one training worker",
                 {"CPU": sc.cpus_per_worker,
                  "GPU": sc.gpus_per_worker if sc.use_gpu else 0.0})
    if "synthesis" in needs:
        # The sampler pool goes on with as many actors as fit (ray_lt.generate.synthesize):
        # one actor beside the writer must fit; fewer than asked is worth a warning.
        s = cfg.synthesis
        if s.cpus_per_actor + s.writer_cpus > cpus:
            problems.append(f"synthesis.cpus_per_actor: one sampler actor ({s.cpus_per_actor:g} "
                            f"CPU) beside the shard writer (synthesis.writer_cpus "
                            f"{s.writer_cpus:g}) needs {s.cpus_per_actor + s.writer_cpus:g} "
                            f"CPUs, but {has}; lower synthesis.cpus_per_actor")
        if s.gpus_per_actor > gpus:
            problems.append(f"synthesis.gpus_per_actor: one sampler actor needs "
                            f"{s.gpus_per_actor:g} GPU, but {has}; set "
                            f"synthesis.gpus_per_actor: 0 or connect to a cluster with GPUs")
        one_node("synthesis.cpus_per_actor", "one sampler actor",
                 {"CPU": s.cpus_per_actor, "GPU": s.gpus_per_actor})
        fit = min(s.num_actors, int((cpus - s.writer_cpus) // s.cpus_per_actor),
                  int(gpus // s.gpus_per_actor) if s.gpus_per_actor > 0 else s.num_actors)
        if not problems and 0 < fit < s.num_actors:
            log.warning(f"synthesis.num_actors: {s.num_actors} asked, {fit} fit beside the "
                        f"writer ({has}); the sampler pool runs with {fit}")
    pool("evaluate", cfg.evaluate.pool)
    if "mining" in needs or (cfg.mining.enabled and "synthesis" in needs):
        pool("mining", cfg.mining.pool)
    if problems:
        raise ConfigError("the Ray cluster cannot run this config\n  " + "\n  ".join(problems))


def ray_session_logs() -> str:
    """Where this Ray session keeps its logs, on the head node."""
    try:
        from ray._private.worker import global_worker

        return str(Path(global_worker.node.get_session_dir_path()) / "logs")
    except AttributeError:  # connected through a client: the path is on the cluster
        return "the head node's /tmp/ray/session_latest/logs"
