"""deploy/README.md and deploy/jobs/: the commands they show parse with the real CLI, the example
jobs validate and name the teacher and the paths each deployment really provides."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest
import yaml
from deploy_files import DEPLOY, K8S, REPO, distillery_envvars, load_compose, parse_distillery, read_env_file

from services.settings import ENV_NAMES, Settings
from student_worker.config import JobSpec
from teacher_server.serve import DEFAULT_PORT as TEACHER_PORT

README = DEPLOY / "README.md"


def readme_commands(program: str) -> list[list[str]]:
    """`program ...` lines of the README's shell blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().rstrip("&").strip()
            if line.startswith(program + " "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_distillery_commands_parse(monkeypatch):
    monkeypatch.chdir(REPO)  # the README runs them from the repository root
    commands = readme_commands("distillery")
    named = {c[0] for c in commands}
    assert {"submit", "jobs", "status", "logs", "cancel"} <= named
    for args in commands:
        args = [a.replace("<", "").replace(">", "") for a in args]
        parse_distillery(args)  # raises on an unknown command, option or a missing file


def test_readme_follow_flags_are_real(monkeypatch):
    monkeypatch.chdir(REPO)
    submit = next(c for c in readme_commands("distillery") if c[0] == "submit")
    assert parse_distillery(submit).params["follow"] is True


def test_cli_parser_check_is_not_vacuous():
    with pytest.raises(Exception, match="No such option|no such option"):
        parse_distillery(["status", "ID", "--no-such-flag"])
    with pytest.raises(Exception, match="No such command|no such command"):
        parse_distillery(["no-such-command"])


def test_variables_named_in_the_docs_are_real():
    known = set(ENV_NAMES) | distillery_envvars()
    texts = [README.read_text(), (DEPLOY / ".env.example").read_text(), (DEPLOY / "docker-compose.yml").read_text()]
    texts += [p.read_text() for p in K8S.rglob("*.yaml")] + [p.read_text() for p in K8S.rglob("*.env.example")]
    for text in texts:
        for name in set(re.findall(r"\b(DISTILLERY_[A-Z0-9_]+|REDIS_URL)\b", text)):
            assert name in known, f"{name} is read by nothing (services/settings.py: ENV_NAMES)"


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_example_jobs_validate_and_fit_their_deployment(which):
    spec = JobSpec.from_file(DEPLOY / "jobs" / f"{which}-job.yaml")
    if which == "compose":
        compose = load_compose(read_env_file(DEPLOY / ".env.example"))
        env = compose["services"]["ray-worker"]["environment"]
        (endpoint,) = spec.teacher.endpoints
        host, port = endpoint.rsplit(":", 1)
        assert host in compose["services"] and host == "teacher"
        assert int(port) == TEACHER_PORT
    else:
        settings = yaml.safe_load((K8S / "base" / "settings.yaml").read_text())["data"]
        env = settings
        (endpoint,) = spec.teacher.endpoints
        assert endpoint == f"dns:///distillery-teacher-headless:{TEACHER_PORT}"
        assert "distillery-teacher-headless" in (K8S / "base" / "teacher.yaml").read_text()
    # the workers get the token variable the spec names, and paths resolve inside the roots
    assert spec.teacher.token_env == "DISTILLERY_TEACHER_TOKEN"
    if which == "compose":
        assert spec.teacher.token_env in env
    else:
        ray = (K8S / "base" / "raycluster.yaml").read_text()
        assert ray.count("name: DISTILLERY_TEACHER_TOKEN") == 2  # head and workers
    assert spec.student.model.startswith(env["DISTILLERY_MODEL_ROOTS"] + "/")
    assert spec.data.path.startswith(env["DISTILLERY_DATA_ROOTS"] + "/")
    assert spec.checkpoint.dir.startswith(env["DISTILLERY_RUNS_DIR"] + "/")
    assert spec.resources.gpus_per_worker == 1
    first_line = (DEPLOY / "jobs" / f"{which}-job.yaml").read_text().splitlines()[0]
    assert first_line.startswith("#")  # example configs start with how to run them
    assert f"distillery submit deploy/jobs/{which}-job.yaml" in (DEPLOY / "jobs" / f"{which}-job.yaml").read_text()


def test_readme_vllm_compose_settings_are_the_env_examples():
    """The deploy/.env lines the README's "Teacher on vLLM" shows are those .env.example shows, and
    name variables compose reads."""
    section = README.read_text().split("## Teacher on vLLM", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```\n(.*?)```", section, re.S)
    shown = dict(line.split("=", 1) for line in block.strip().splitlines())
    example = dict(re.findall(r"^#\s+(TEACHER_[A-Z_]+)=(.*)$", (DEPLOY / ".env.example").read_text(), re.M))
    assert shown == example and shown["TEACHER_ENGINE"] == "vllm"
    assert set(shown) <= set(read_env_file(DEPLOY / ".env.example"))
    assert "kubectl apply -k deploy/k8s/overlays/vllm" in section and (K8S / "overlays" / "vllm").is_dir()


def test_readme_ports_match_the_defaults():
    text = README.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("Ports:"))
    ports = dict(re.match(r"\s*(.+?) (\d+)", item).groups() for item in line.removeprefix("Ports:").split(","))
    assert int(ports["API"]) == Settings().api_port
    assert int(ports["teacher gRPC"]) == TEACHER_PORT
    assert int(ports["Ray dashboard and Jobs API"]) == 8265
    assert int(ports["Redis"]) == 6379


# ---------------------------------------------------------------------- the API the deploy files probe
def _settings_of(which: str) -> Settings:
    if which == "compose":
        env = load_compose(read_env_file(DEPLOY / ".env.example"))["services"]["api"]["environment"]
    else:
        env = yaml.safe_load((K8S / "base" / "settings.yaml").read_text())["data"]
        env = {**env, **read_env_file(K8S / "base" / "secrets" / "api.env.example")}
    return Settings.from_env({k: str(v) for k, v in env.items()})


def test_probed_endpoints_answer_as_the_checks_expect():
    """Docker's check and Kubernetes' readiness probe hit /readyz (2xx = ready), liveness /healthz."""
    from fastapi.testclient import TestClient

    from services.api import create_app

    paths = set(create_app(Settings(), ray_ping=lambda: True).openapi()["paths"])
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    nothing_there = Settings(redis_url="redis://127.0.0.1:1/0")  # port 1: refused at once
    with TestClient(create_app(nothing_there, ray_ping=lambda: False)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # Redis and Ray unreachable: not ready
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_example_jobs_pass_the_api_checks_with_the_deployed_settings(which):
    """The API accepts the example job as submitted (paths inside the roots, run dir inside
    DISTILLERY_RUNS_DIR, an allowed token variable) under the settings each deployment gives it."""
    import json

    from services.api import JobService, check_exposure

    settings = _settings_of(which)
    check_exposure(dataclasses.replace(settings, api_host="0.0.0.0"))  # exposed, so keys are set
    service = JobService(settings, store=None, ray_ping=lambda: True)  # accept() reads no store
    data = yaml.safe_load((DEPLOY / "jobs" / f"{which}-job.yaml").read_text())
    spec = service.accept(json.dumps(data).encode())
    assert spec.checkpoint.dir == f"/runs/{which}-example"
