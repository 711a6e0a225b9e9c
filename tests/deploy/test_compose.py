"""deploy/docker-compose.yml: valid Compose, secrets only from deploy/.env, and every service wired
to the ports, commands, health endpoints and settings the code really has. Offline: no Docker."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from deploy_files import (COMPOSE_FILE, ENV_EXAMPLE, REPO, MissingVariable, compose_command, compose_variables,
                          distillery_envvars, load_compose, parse_distillery, parse_ray_start, read_env_file)

from services.settings import ENV_NAMES, Settings
from teacher_server.serve import DEFAULT_PORT as TEACHER_PORT

SECRETS = ("DISTILLERY_API_KEYS", "DISTILLERY_TEACHER_TOKEN")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env) -> dict:
    return load_compose(env)


@pytest.fixture(scope="module")
def vllm_env(env) -> dict[str, str]:
    """.env.example with the vLLM settings its comments show (the `#   TEACHER_...=` lines)."""
    shown = dict(re.findall(r"^#\s+(TEACHER_[A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    assert set(shown) == {"TEACHER_EXTRAS", "TEACHER_ENGINE", "TEACHER_ENGINE_ARGS", "TEACHER_GPUS"}
    assert set(shown) <= set(env)  # the same variables, other values
    return {**env, **shown}


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    """The Compose specification's JSON schema, as vendored by check-jsonschema."""
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def _validate(instance: dict, schema: dict) -> None:
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_file_validates_against_the_compose_spec(compose_schema, compose, vllm_env):
    _validate(load_compose(), compose_schema)  # as written, with ${...} in place
    _validate(compose, compose_schema)  # as compose interpolates it from .env.example
    _validate(load_compose(vllm_env), compose_schema)  # and with its vLLM settings


def test_schema_check_is_not_vacuous(compose_schema, compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["teacher"]["deploy"]["resources"]["reservations"]["devices"][0]["gpu_count"] = 1
    with pytest.raises(AssertionError, match="gpu_count"):
        _validate(broken, compose_schema)


def test_env_example_and_compose_name_the_same_variables(env):
    used = compose_variables(COMPOSE_FILE.read_text())
    assert used == set(env), (f"used by compose, missing from .env.example: {sorted(used - set(env))}; "
                              f"in .env.example, unused: {sorted(set(env) - used)}")


def test_secrets_come_only_from_the_env_file(env):
    text = COMPOSE_FILE.read_text()
    raw = load_compose()
    for name in SECRETS:
        for service in raw["services"].values():
            value = (service.get("environment") or {}).get(name)
            if value is not None:  # a reference that must be set, never a value or a default
                assert value == f"${{{name}:?set {name} in deploy/.env}}", value
        assert env[name] not in text
        with pytest.raises(MissingVariable, match=name):
            load_compose({k: v for k, v in env.items() if k != name})
    assert "env_file" not in text  # each service gets only the variables it reads
    assert ".env" in (COMPOSE_FILE.parent / ".gitignore").read_text().split()


def test_service_environment_uses_the_names_the_services_read(compose):
    known = set(ENV_NAMES) | distillery_envvars()
    assert "DISTILLERY_TEACHER_TOKEN" in known  # the teacher CLI's --token reads it
    for name, service in compose["services"].items():
        for var in service.get("environment") or {}:
            assert var in known, f"{name}: {var} is read by nothing (services/settings.py: ENV_NAMES)"
    for name in ("api", "scheduler"):  # both really parse what they are given
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items() if k in ENV_NAMES}
        Settings.from_env(env)


def test_settings_point_at_the_compose_services(compose):
    services = compose["services"]
    for name in ("api", "scheduler", "ray-head", "ray-worker"):
        s = Settings.from_env(services[name]["environment"])
        redis = urlsplit(s.redis_url)
        assert (redis.hostname, redis.port) == ("redis", urlsplit(Settings().redis_url).port) == ("redis", 6379)
        ray = urlsplit(s.ray_address)
        assert (ray.hostname, ray.port) == ("ray-head", urlsplit(Settings().ray_address).port) == ("ray-head", 8265)
        assert (s.runs_dir, s.model_roots, s.data_roots) == ("/runs", ("/models",), ("/data",))
        mounts = {v.split(":")[1]: v for v in services[name]["volumes"]}
        assert mounts["/models"].endswith(":ro") and mounts["/data"].endswith(":ro")
        assert mounts["/runs"] == "runs:/runs"  # one volume: checkpoints seen by every node
    assert Settings.from_env(services["api"]["environment"]).api_keys  # non-loopback API needs keys


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose):
    redis = compose["services"]["redis"]
    args = redis["command"]
    assert args[0] == "redis-server" and args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # reachable from the stack only


def test_teacher_service(compose, env):
    teacher = compose["services"]["teacher"]
    argv = compose_command(teacher)
    assert argv[0] == "distillery"
    ctx = parse_distillery(argv[1:])
    assert ctx.command.name == "serve" and ctx.parent.info_name == "teacher"
    p = ctx.params
    assert p["host"] == "0.0.0.0" and p["port"] == TEACHER_PORT == 50051
    assert p["engine"] == env["TEACHER_ENGINE"] == "transformers"
    assert p["device"] == "cuda" and str(p["model"]) == f"/models/{env['TEACHER_MODEL']}"
    assert p["dtype"] == env["TEACHER_DTYPE"]
    assert p["token"] is None  # not on the command line: from DISTILLERY_TEACHER_TOKEN
    assert "DISTILLERY_TEACHER_TOKEN" in teacher["environment"]
    assert f"{env['MODELS_DIR']}:/models:ro" in teacher["volumes"]
    (device,) = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert device["device_ids"] == [env["TEACHER_GPUS"]]
    assert teacher["healthcheck"]["test"][-1] == f"grpc://127.0.0.1:{p['port']}"
    # SIGTERM drain: in-flight calls get --grace-s, and compose must wait longer than that
    assert float(teacher["stop_grace_period"].rstrip("s")) > p["grace_s"] + p["drain_delay_s"]


def test_teacher_service_on_vllm(vllm_env):
    """The vLLM settings .env.example shows: an image with the vllm extra, `--engine vllm` without
    --device (the CLI refuses it with vllm), and one GPU reserved per tensor-parallel rank."""
    teacher = load_compose(vllm_env)["services"]["teacher"]
    p = parse_distillery(compose_command(teacher)[1:]).params
    assert p["engine"] == "vllm" and p["device"] is None and not p["compile"]
    gpus = vllm_env["TEACHER_GPUS"].split(",")
    assert p["tensor_parallel_size"] == len(gpus) == len(set(gpus)) > 1
    (device,) = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == [vllm_env["TEACHER_GPUS"]]  # the daemon joins them with commas
    extras = teacher["build"]["args"]["TEACHER_EXTRAS"]
    assert extras == "vllm" and extras in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    size = re.fullmatch(r"(\d+)gb", teacher["shm_size"])  # vLLM's workers share data in /dev/shm
    assert size and int(size[1]) >= 1


def test_teacher_engine_args_default_and_empty(env):
    unset = {k: v for k, v in env.items() if k != "TEACHER_ENGINE_ARGS"}
    teacher = load_compose(unset)["services"]["teacher"]
    assert parse_distillery(compose_command(teacher)[1:]).params["device"] == "cuda"  # the default
    empty = {**env, "TEACHER_ENGINE": "vllm", "TEACHER_ENGINE_ARGS": ""}  # set but empty: no flags
    teacher = load_compose(empty)["services"]["teacher"]
    p = parse_distillery(compose_command(teacher)[1:]).params
    assert (p["engine"], p["device"], p["tensor_parallel_size"]) == ("vllm", None, 1)


def test_ray_head_and_workers(compose):
    services = compose["services"]
    head = parse_ray_start(services["ray-head"]["command"][2:]).params
    assert services["ray-head"]["command"][:2] == ["ray", "start"]
    assert head["head"] and head["block"] and head["dashboard_host"] == "0.0.0.0"
    assert head["dashboard_port"] == 8265 and head["port"] == 6379
    assert "127.0.0.1:8265:8265" in services["ray-head"]["ports"]
    assert services["ray-head"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{head['dashboard_port']}/api/gcs_healthz"

    worker = parse_ray_start(services["ray-worker"]["command"][2:]).params
    assert worker["address"] == f"ray-head:{head['port']}" and worker["block"] and not worker["head"]
    assert services["ray-worker"]["healthcheck"]["test"][-1] == (
        f"http://127.0.0.1:{worker['dashboard_agent_listen_port']}/api/local_raylet_healthz")
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "container_name" not in services["ray-worker"]  # `--scale ray-worker=N` needs free names
    assert not any("ports" in services[s] for s in ("ray-worker", "scheduler"))
    for name in ("ray-head", "ray-worker"):  # student workers read the teacher token (token_env)
        assert "DISTILLERY_TEACHER_TOKEN" in services[name]["environment"]


def test_ray_health_endpoints_exist_in_the_installed_ray():
    import ray.dashboard.modules.reporter.healthz_agent as agent
    import ray.dashboard.modules.reporter.reporter_head as head

    assert '"/api/gcs_healthz"' in Path(head.__file__).read_text()
    assert '"/api/local_raylet_healthz"' in Path(agent.__file__).read_text()


def test_scheduler_and_api_commands_parse_with_the_cli(compose):
    services = compose["services"]
    assert services["scheduler"]["command"][0] == "distillery"
    assert parse_distillery(services["scheduler"]["command"][1:]).command.name == "scheduler"
    api = services["api"]
    assert api["command"][0] == "distillery"
    p = parse_distillery(api["command"][1:]).params
    assert (p["host"], p["port"]) == ("0.0.0.0", Settings().api_port) == ("0.0.0.0", 8000)
    assert api["ports"] == [f"127.0.0.1:{p['port']}:{p['port']}"]
    assert api["healthcheck"]["test"][-1] == f"http://127.0.0.1:{p['port']}/readyz"
    for dep in ("redis", "ray-head"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"
        assert services["scheduler"]["depends_on"][dep]["condition"] == "service_healthy"


def test_services_share_one_image_built_from_the_ray_image(compose):
    services = compose["services"]
    images = {services[n]["image"] for n in ("ray-head", "ray-worker", "scheduler", "api")}
    assert len(images) == 1
    for name in ("ray-head", "ray-worker", "scheduler", "api"):
        build = services[name]["build"]
        assert build["dockerfile"] == "deploy/services.Dockerfile" and build["context"] == ".."
        assert build["args"]["RAY_IMAGE"].startswith("rayproject/ray:")
    assert services["teacher"]["build"]["dockerfile"] == "deploy/teacher.Dockerfile"
    for service in services.values():  # every Dockerfile the compose file builds exists
        if "build" in service:
            assert (COMPOSE_FILE.parent / service["build"]["context"] / service["build"]["dockerfile"]).exists()


def test_env_example_marks_its_placeholders(env):
    """The placeholders of .env.example are marked as such, and the real file is ignored by git."""
    text = ENV_EXAMPLE.read_text()
    for name in ("DISTILLERY_API_KEYS", "DISTILLERY_TEACHER_TOKEN"):
        assert "replace-me" in env[name]
        line = text.index(f"\n{name}=")
        assert "REPLACE" in text[max(0, line - 200):line]
    assert yaml.safe_load(COMPOSE_FILE.read_text())["name"] == "distillery"
