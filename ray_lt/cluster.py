"""What the connected Ray cluster can hold: its nodes now and, on a cluster with an autoscaler,
the node types it may add (a ``ray up`` cluster ships every worker type with
``min_workers: 0``, so a run often starts on the head node alone).

The node types come from the autoscaler's config: ``ray.autoscaler_config`` when set, else the
config the cluster reported to its GCS (KubeRay, autoscaler v2), else the one the head node's
autoscaler monitor was started with (``ray start --head --autoscaling-config``, which ``ray
up`` runs; readable when the driver runs on the head node, as ``ray job submit`` does).
``ray_lt.pipeline.check_cluster_resources`` refuses only what no node could ever hold, and the
sampler pool asks the autoscaler for what the config says (``request_pool``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from ray_lt.errors import ConfigError

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
