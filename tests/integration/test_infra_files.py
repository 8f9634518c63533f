"""The files users deploy with: docker-compose.yml + .env.example (no secrets in code), prefect.yaml
(its deployments register on the stack's Prefect server), the Kubernetes GPU work-pool template
(accepted by the Prefect server, renders a Job that requests a GPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, http_json

pytestmark = pytest.mark.integration

INFRA = REPO / "infra"
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])[^}]*)?\}")


def _env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_compose_reads_every_variable_from_env_example_and_holds_no_secrets():
    text = (INFRA / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(compose["services"])
    used = {m.group(1) for m in VAR.finditer(text)}
    documented = _env_example()
    assert used - set(documented) == set(), f"variables used in docker-compose.yml but missing from .env.example: {used - set(documented)}"
    # every secret is a ${VAR}: no literal password/secret/key values in the compose file
    for service, spec in compose["services"].items():
        env = spec.get("environment") or {}
        for key, value in env.items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert isinstance(value, str) and value.startswith("${"), f"{service}.{key} must come from .env"
    # the tracking server: MLflow's basic-auth app with our index page (selfattn-auth, flows/mlflow_app.py),
    # admin password from the environment, PostgreSQL + MinIO behind it
    mlflow = compose["services"]["mlflow"]
    assert "--app-name=selfattn-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_AUTH_ADMIN_PASSWORD")
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "postgresql+asyncpg" in compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    for name, spec in compose["services"].items():
        if name not in ("minio-init", "deploy", "prefect-worker", "prefect-worker-gpu"):
            assert "healthcheck" in spec, f"{name} has no health check"
    # the auth config file carries no password
    assert "admin_password" not in (INFRA / "mlflow" / "basic_auth.ini").read_text().replace("# admin_password", "")


def test_prefect_yaml_deployments_register_on_the_server(stack, stack_env):
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"nightly", "smoke"} <= names
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"
    entry_file = REPO / nightly["entrypoint"].split(":")[0]
    assert entry_file.is_file(), f"infra/prefect.yaml's entrypoint {entry_file} does not exist"
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.run(
        [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
        env=stack_env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployments = http_json("POST", f"{stack['prefect_api_url']}/deployments/filter", {})
    by_name = {d["name"]: d for d in deployments}
    assert names <= set(by_name)
    assert by_name["nightly"]["work_pool_name"] == stack["pool"]
    schedules = by_name["nightly"]["schedules"]
    assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"]
    assert by_name["weekly-search"]["parameters"]["overrides"] == ["search.n_trials=24"]


def test_k8s_gpu_job_template_is_accepted_and_requests_a_gpu(stack):
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    pool = "it-k8s-gpu"
    created = http_json(
        "POST", f"{stack['prefect_api_url']}/work_pools/",
        {"name": pool, "type": "kubernetes", "base_job_template": template},
    )  # fmt: skip
    assert created["base_job_template"] == template  # the server validated and stored it

    # render the Job the way a worker does: variable defaults, then a deployment's job_variables
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update({"gpu_count": 2, "image": "registry.example/selfattn:cuda", "name": "nightly-gpu"})
    job = apply_values(template["job_configuration"], values, remove_notset=True)
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example/selfattn:cuda"
    assert job["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["envFrom"] == [{"secretRef": {"name": "selfattn-pipeline"}}]  # credentials from a Secret
    # and the k8s deployments file points at this pool with one GPU
    k8s = yaml.safe_load((INFRA / "k8s" / "prefect.yaml").read_text())
    dep = k8s["deployments"][0]
    assert dep["work_pool"]["name"] == "selfattn-k8s-gpu" and dep["work_pool"]["job_variables"]["gpu_count"] == 1
