"""Loaders for the deploy/ files, shared by the deploy tests (all offline, nothing is started).

- compose: the file as written, and as `docker compose` interpolates it from an env file.
- kustomize: `kubectl kustomize` where kubectl is installed (it embeds kustomize), and always a small
  composition in Python (resources, namespace, images, patches) that checks what kustomize would.
- CLI: argument lists parsed by the real `distillery` and `ray start` commands, never executed.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"


# ---------------------------------------------------------------------- env files and compose
def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as docker compose and kustomize's `envs:` read them (no quotes used here)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]+)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(KeyError):
    pass


def interpolate_str(text: str, env: dict[str, str]) -> str:
    """Compose interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?err}, ${VAR?err}."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        expr = m.group("braced") or m.group("bare")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?(.*)", expr).groups()
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def compose_variables(text: str) -> set[str]:
    """Names of the variables a compose file interpolates."""
    names = set()
    for m in _VAR.finditer(text):
        expr = m.group("braced") or m.group("bare")
        if expr:
            names.add(re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr).group(0))
    return names


def load_compose(env: dict[str, str] | None = None) -> dict:
    """The compose model (YAML merge keys resolved), interpolated when `env` is given."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return raw if env is None else interpolate(raw, env)


# ---------------------------------------------------------------------- kustomize
def kubectl() -> str | None:
    return shutil.which("kubectl")


def with_example_secrets(tmp: Path) -> Path:
    """A copy of deploy/k8s whose ignored secret env files are made from their examples."""
    dst = tmp / "k8s"
    shutil.copytree(K8S, dst, ignore=shutil.ignore_patterns("*.env"))
    for example in dst.rglob("*.env.example"):
        example.with_suffix("").write_text(example.read_text())
    return dst


def kustomize_build(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`: kustomize's own rendering (kubectl embeds it)."""
    exe = kubectl()
    assert exe, "kubectl is not installed"
    out = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def compose_kustomization(directory: Path) -> list[dict]:
    """What kustomize builds, for the features these files use: resources (files and bases),
    namespace, labels, secretGenerator (envs), images, patches (strategic merge by file, JSON 6902
    with a target). Fails like kustomize on a missing file or a patch that targets nothing."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "namespace", "labels", "resources", "secretGenerator", "images",
               "patches"}
    assert set(kz) <= allowed, f"{directory}: composition check does not know {set(kz) - allowed}"
    docs: list[dict] = []
    for res in kz.get("resources", []):
        path = directory / res
        assert path.exists(), f"{directory}/kustomization.yaml: resource {res} does not exist"
        docs += compose_kustomization(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in kz.get("secretGenerator", []):
        data: dict[str, str] = {}
        for env_file in gen.get("envs", []):
            assert (directory / env_file).exists(), f"{directory}: secret env file {env_file} does not exist"
            data.update(read_env_file(directory / env_file))
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": gen["name"]}, "data": data})
    for patch in kz.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text()) if "path" in patch \
            else yaml.safe_load(patch["patch"])
        if "target" in patch:
            t = patch["target"]
            hits = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]
                    and d["apiVersion"].split("/")[0] == t.get("group", d["apiVersion"].split("/")[0])]
            assert hits, f"{directory}: patch {patch} targets no object"
            for d in hits:
                apply_json6902(d, body)
        else:
            hits = [d for d in docs if d["kind"] == body["kind"] and d["metadata"]["name"] == body["metadata"]["name"]]
            assert hits, f"{directory}: patch {patch['path']} targets no object"
            for d in hits:
                strategic_merge(d, body)
    for doc in docs:
        if kz.get("namespace") and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kz["namespace"]
        for label_set in kz.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
        for image in kz.get("images", []):
            for container in pod_containers(doc):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', _tag)}"
    return docs


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json6902(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove, failing on a path that does not exist (as kustomize does)."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            assert op["op"] == "add" or index < len(node), f"{op['path']} does not exist"
            if op["op"] == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[index] = copy.deepcopy(op["value"])
            else:
                del node[index]
        else:
            assert op["op"] == "add" or last in node, f"{op['op']} {op['path']}: no such field"
            if op["op"] == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(op["value"])


def strategic_merge(base: dict, patch: dict) -> None:
    """Maps merge; lists of named objects (containers, volumes, env) merge by name, and the patch's
    new items go first, as kustomize puts them; other values replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value)
        elif (isinstance(value, list) and isinstance(base.get(key), list) and value
              and all(isinstance(v, dict) and "name" in v for v in value + base[key])):
            by_name = {item["name"]: item for item in base[key]}
            new = []
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    new.append(copy.deepcopy(item))
            base[key][:0] = new
        else:
            base[key] = copy.deepcopy(value)


# ---------------------------------------------------------------------- walking manifests
def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) of a workload: Deployment, StatefulSet, RayCluster head and workers."""
    spec = doc.get("spec") or {}
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield doc["metadata"]["name"], spec["template"]
    elif doc["kind"] == "RayCluster":
        yield f"{doc['metadata']['name']}/head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{doc['metadata']['name']}/{group['groupName']}", group["template"]


def pod_containers(doc: dict) -> Iterator[dict]:
    for _, template in pod_templates(doc):
        yield from template["spec"].get("initContainers", [])
        yield from template["spec"]["containers"]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def compose_command(service: dict) -> list[str]:
    """A compose service's command as the container gets it: a string is split into words (compose
    splits it like a shell would, after substituting variables, without running a shell)."""
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def expand_k8s_vars(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in command and args ($$(VAR) stays literal)."""
    return [re.sub(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in args]


# ---------------------------------------------------------------------- CLIs, parsed only
def parse_distillery(args: list[str]):
    """Parse `distillery ARGS` down to the leaf command without running it; returns its context.
    Raises the CLI's usage error on an unknown command or option, or a bad value."""
    import typer

    from services.cli import app

    command = typer.main.get_command(app)
    ctx = command.make_context("distillery", list(args))
    while hasattr(command, "resolve_command"):  # a group: descend into the named subcommand
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        assert rest, f"`distillery {' '.join(args)}` names no command"
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def parse_ray_start(args: list[str]):
    """Parse `ray start ARGS` with Ray's own click command (the installed Ray)."""
    from ray.scripts.scripts import cli

    return cli.commands["start"].make_context("start", list(args))


def distillery_envvars() -> set[str]:
    """Environment variables the `distillery` CLI itself reads through its options (e.g. the
    teacher token), beside services.settings.ENV_NAMES."""
    import typer

    from services.cli import app

    names: set[str] = set()

    def walk(command) -> None:
        for param in command.params:
            env = getattr(param, "envvar", None)
            names.update([env] if isinstance(env, str) else env or [])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return names
