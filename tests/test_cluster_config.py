"""cluster.yaml against Ray's own cluster-config schema, and the product's promises about it."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_with_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # What `ray up` does before launching anything: fill the provider's defaults, then check
    # against ray-schema.json (a jsonschema.ValidationError names any bad key).
    validate_config(prepare_config(config))
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [name for name in nodes if name.startswith("gpu.")]
    assert gpu_types and all(nodes[n]["min_workers"] == 0 for n in gpu_types)  # autoscaling
    assert any("pip install -e /home/ubuntu/ray_lt" in c for c in config["setup_commands"])
    assert any("torch==2.14.1" in c for c in config["setup_commands"])
    # the dashboard binds to localhost and only SSH is open: reach it with `ray dashboard`
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"]
               if c.startswith("ray start"))
    ports = [(p["FromPort"], p["ToPort"])
             for p in config["provider"]["security_group"]["IpPermissions"]]
    assert ports == [(22, 22)]


def test_a_typo_in_the_cluster_yaml_is_caught():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu.a10g.worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))
