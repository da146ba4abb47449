"""The documentation tells the truth: README.md, docs/*.md and docker-compose.yml are checked
against the code.

- ``docs/configuration.md`` has a table per policy dataclass; every field and constructor
  parameter must be there, with the signature's type and default.
- Every ```python block of README.md and docs/*.md runs (the blocks of one file in order,
  in one fresh interpreter, like a doctest). A block may be skipped only with an
  ``<!-- not-run: reason -->`` comment right before it; there are none today, and at
  most ``MAX_NOT_RUN`` may ever be.
- Every ``limitpal-tasks ...`` / ``celery -A proj limitpal ...`` line of a ```console
  block parses against the real command, and the ones that make sense on a store run
  against the local Redis (db 0, a prefix of their own).
- ``docker-compose.yml`` has the services the examples need, pinned images, healthchecks,
  ``service_healthy`` dependencies and the README's commands, and ``docker compose config``
  accepts it where docker compose is installed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from limitpal_tasks import DeadLetter, Pipeline, Policy, TaskContext, cli
from limitpal_tasks.core import policy as policy_module
from limitpal_tasks.dramatiq import LimitpalMiddleware
from limitpal_tasks.integrations._runtime import Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
COMPOSE = ROOT / "docker-compose.yml"
MAX_NOT_RUN = 3
REDIS_URL = "redis://127.0.0.1:6379/0"

DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]
DOC_PAGES = ("concepts", "configuration", "operations", "migration", "architecture")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- markdown ---------------------------------------------------------------------------------

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*\Z", re.S)


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, text, first line number and skip reason."""

    lang: str
    body: str
    line: int
    not_run: str | None


def blocks(path: Path) -> list[Block]:
    text = path.read_text("utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        marker = _NOT_RUN.search(before[-300:])
        found.append(
            Block(
                match["lang"],
                match["body"],
                before.count("\n") + 2,  # the line after the opening fence
                marker["reason"] if marker else None,
            )
        )
    return found


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` is a literal bar)."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def tables_by_heading(text: str) -> dict[str, list[dict[str, str]]]:
    """The first table after each heading, as rows keyed by the header cells."""
    out: dict[str, list[dict[str, str]]] = {}
    heading: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif heading is not None and heading not in out and line.startswith("|"):
            header = split_row(line)
            rows = []
            i += 2  # the separator row
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, split_row(lines[i]))))
                i += 1
            out[heading] = rows
            continue
        i += 1
    return out


# -- the configuration reference ------------------------------------------------------------------


def policy_dataclasses() -> list[type]:
    """Every dataclass the policy module defines: each needs a section of configuration.md."""
    return [
        obj
        for _, obj in inspect.getmembers(policy_module, inspect.isclass)
        if dataclasses.is_dataclass(obj) and obj.__module__ == policy_module.__name__
    ]


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the reference must say about one field."""

    name: str
    type: str
    default: Any  # REQUIRED, DERIVED, or the default value


REQUIRED, DERIVED = "required", "(derived)"


def expected_fields(target: Callable[..., Any], prefix: str = "") -> list[Expected]:
    """The documented fields of ``target``: constructor parameters, then dataclass-only fields."""
    out = []
    params = {
        name: p
        for name, p in inspect.signature(target).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    for name, param in params.items():
        default: Any = REQUIRED if param.default is param.empty else param.default
        field = fields.get(name)
        if field is not None and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        out.append(Expected(prefix + name, str(param.annotation), default))
    for name, field in fields.items():
        if name not in params:
            out.append(Expected(prefix + name, str(field.type), DERIVED))
    return out


def _value(cell: str) -> Any:
    text = cell.strip().strip("`")
    if text in (REQUIRED, DERIVED):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return eval(text, {"__builtins__": {}, "Exception": Exception})  # our own docs, e.g. (Exception,)


def reference_problems(rows: list[dict[str, str]], expected: list[Expected]) -> list[str]:
    """Differences between a reference table and the code; empty when they agree."""
    problems = []
    documented = {(row.get("field") or row["setting"]).strip("`"): row for row in rows}
    for field in expected:
        row = documented.get(field.name)
        if row is None:
            problems.append(f"{field.name}: missing")
            continue
        if row["type"].strip("`") != field.type:
            problems.append(f"{field.name}: type {row['type']!r}, the code says {field.type!r}")
        value = _value(row["default"])
        numbers = isinstance(value, (int, float)) and isinstance(field.default, (int, float))
        if value != field.default or (type(value) is not type(field.default) and not numbers):
            problems.append(f"{field.name}: default {row['default']!r}, the code says {field.default!r}")
        if not row.get("meaning"):
            problems.append(f"{field.name}: no meaning")
    known = {field.name for field in expected}
    problems.extend(f"{name}: documented but not in the code" for name in documented if name not in known)
    return problems


@pytest.fixture(scope="module")
def reference() -> dict[str, list[dict[str, str]]]:
    return tables_by_heading(CONFIGURATION.read_text("utf-8"))


@pytest.mark.parametrize("cls", policy_dataclasses(), ids=lambda cls: cls.__name__)
def test_every_policy_field_is_documented_with_the_code_default(
    cls: type, reference: dict[str, list[dict[str, str]]]
) -> None:
    """Each policy dataclass has a table listing every field with the signature's type and default."""
    assert cls.__name__ in reference, f"docs/configuration.md has no section (table) for {cls.__name__}"
    assert reference_problems(reference[cls.__name__], expected_fields(cls)) == []


def test_the_worker_settings_are_documented_with_their_defaults(
    reference: dict[str, list[dict[str, str]]],
) -> None:
    """Every ``limitpal_*`` setting the integrations read is in the table, with its default."""
    assert reference_problems(reference["Worker settings"], expected_fields(Settings, "limitpal_")) == []


def test_the_dramatiq_middleware_arguments_are_documented(
    reference: dict[str, list[dict[str, str]]],
) -> None:
    """``LimitpalMiddleware``'s constructor arguments are in its table, with their defaults."""
    expected = expected_fields(LimitpalMiddleware.__init__)
    assert reference_problems(reference["LimitpalMiddleware"], expected) == []


def test_the_reference_check_catches_a_missing_field_and_a_wrong_default() -> None:
    """The checker itself: a dropped row and a changed default are both reported."""
    rows = tables_by_heading(CONFIGURATION.read_text("utf-8"))["Breaker"]
    expected = expected_fields(policy_module.Breaker)
    dropped = [row for row in rows if row["field"] != "`busy_delay`"]
    changed = [{**row, "default": "`40.0`"} if row["field"] == "`open_for`" else row for row in rows]
    assert reference_problems(dropped, expected) == ["busy_delay: missing"]
    assert reference_problems(changed, expected) == ["open_for: default '`40.0`', the code says 60.0"]


# -- python blocks ---------------------------------------------------------------------------------

_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    blocks = json.loads(sys.stdin.read())
    namespace = {"__name__": "__docs__"}
    for block in blocks:
        try:
            exec(compile(block["body"], f"{block['path']}:{block['line']}", "exec"), namespace)
        except BaseException:
            print(f"block at {block['path']}:{block['line']} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    print(f"ran {len(blocks)} blocks")
    """
)


@pytest.mark.parametrize(
    "path", [p for p in DOCUMENTS if any(b.lang == "python" for b in blocks(p))], ids=_rel
)
def test_every_python_block_runs(path: Path) -> None:
    """The ```python blocks of a document run in order in one fresh interpreter, without error."""
    runnable = [
        {"body": b.body, "line": b.line, "path": _rel(path)}
        for b in blocks(path)
        if b.lang == "python" and b.not_run is None
    ]
    assert runnable, f"{_rel(path)}: every python block is marked not-run"
    completed = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(runnable),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"ran {len(runnable)} blocks" in completed.stdout


def test_not_run_blocks_are_few_and_justified() -> None:
    """A block may skip execution only with a stated reason, and there are at most a few."""
    skipped = [(path, b) for path in DOCUMENTS for b in blocks(path) if b.not_run is not None]
    assert len(skipped) <= MAX_NOT_RUN, [f"{_rel(p)}:{b.line}" for p, b in skipped]
    for path, block in skipped:
        assert block.lang == "python", f"{_rel(path)}:{block.line}: not-run on a {block.lang} block"
        assert len(block.not_run or "") >= 10, f"{_rel(path)}:{block.line}: say why it cannot run"


def test_every_docs_page_has_runnable_examples() -> None:
    """The pages written as guides show code, and that code is executed (above)."""
    for page in DOC_PAGES:
        assert any(b.lang == "python" for b in blocks(DOCS / f"{page}.md")), page


# -- links --------------------------------------------------------------------------------------------


def test_readme_links_every_docs_page() -> None:
    """README's Documentation list points at every guide."""
    readme = README.read_text("utf-8")
    for page in DOC_PAGES:
        assert f"(docs/{page}.md)" in readme, page


@pytest.mark.parametrize("path", DOCUMENTS, ids=_rel)
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link of a document points at a file of the repository."""
    text = path.read_text("utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{_rel(path)} links to {target}, which does not exist"


# -- console blocks ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``limitpal-tasks`` invocation shown in a console block."""

    where: str
    args: tuple[str, ...]
    celery: bool  # shown as `celery -A proj limitpal ...`


def commands() -> list[Command]:
    out = []
    for path in DOCUMENTS:
        for block in blocks(path):
            if block.lang != "console":
                continue
            for offset, raw in enumerate(block.body.splitlines()):
                words = shlex.split(raw.removeprefix("$ "), comments=True)
                where = f"{_rel(path)}:{block.line + offset}"
                if words[:1] == ["limitpal-tasks"]:
                    out.append(Command(where, tuple(words[1:]), celery=False))
                elif words[:1] == ["celery"] and "limitpal" in words:
                    out.append(Command(where, tuple(words[words.index("limitpal") + 1 :]), celery=True))
    return out


COMMANDS = commands()


class _Reached(Exception):
    """Raised instead of opening the store: the command line was parsed and validated."""


def test_console_blocks_show_commands() -> None:
    """The operations guide and the README show the CLI (so the checks below check something)."""
    shown = {c.args[0] for c in COMMANDS}
    assert {"status", "trip", "reset", "pause", "resume", "override", "dead"} <= shown


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where} {' '.join(c.args)}")
def test_console_commands_parse(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command line is accepted by the real CLI: command names, options and their values."""

    def reached(*_: object) -> object:
        raise _Reached

    monkeypatch.setattr(cli, "_open", reached)
    monkeypatch.setattr(cli, "_load_object", lambda *_: object())
    monkeypatch.setattr("limitpal_tasks.demo.run_demo", reached)
    app = object() if command.celery else None  # `celery -A proj limitpal` passes the app
    result = CliRunner().invoke(cli.main, list(command.args), input="y\n", obj=app)
    if result.exit_code == 0 and result.exception is None:
        return
    assert isinstance(result.exception, _Reached), f"{command.where}: {result.output}"


# Commands that do something on a store: run them against Redis (db 0, a prefix of their own).
_PARSE_ONLY = ("replay", "demo", "--watch")


@pytest.mark.redis
def test_console_commands_run_against_redis(require_server: Callable[[str, str, int], None]) -> None:
    """The commands of the docs that read or steer a store succeed on a real one, in order."""
    require_server("redis", "127.0.0.1", 6379)
    from limitpal_tasks.stores.redis import RedisStore

    prefix = f"docs-test-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(REDIS_URL, prefix=prefix)
    try:
        runnable = [c for c in COMMANDS if not any(word in c.args for word in _PARSE_ONLY)]
        # A key needs a rate limit in use before `override` can pick it (a paused key admits
        # nothing, so before any command runs); a dead letter must exist to be shown.
        overridden = {c.args[1] for c in runnable if c.args[0] == "override"}
        assert overridden
        pipeline = Pipeline(store)
        for key in overridden:
            assert pipeline.admit(Policy("docs", key=key, rate="10/s"), TaskContext("docs")).admitted
        for command in runnable:
            if command.args[:2] == ("dead", "show"):
                store.put_dead(_letter(command.args[2]))
            args = [*command.args, "--store", REDIS_URL, "--prefix", prefix]
            result = CliRunner().invoke(cli.main, args, input="y\n")
            assert result.exit_code == 0, f"{command.where}: {' '.join(command.args)}\n{result.output}"
    finally:
        keys = list(store.client.scan_iter(match=f"{prefix}:*"))
        if keys:
            store.client.delete(*keys)
        store.close()


def _letter(letter_id: str) -> DeadLetter:
    return DeadLetter(
        id=letter_id,
        task_name="proj.charge",
        reason="max_attempts",
        policy="payments",
        key="tenant:acme",
        args=("acme", 100),
        kwargs={},
        headers={},
        attempts=5,
        deferrals=0,
        first_seen=None,
        dead_at=0.0,
        error="PaymentsUnavailable: 503",
    )


# -- docker-compose.yml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(COMPOSE.read_text("utf-8"))
    assert isinstance(data, dict)
    return data


SERVICES = {"redis", "rabbitmq", "upstream", "celery-worker", "dramatiq-worker", "producer"}


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    """Redis, RabbitMQ, the upstream, a worker per framework and the producer."""
    assert set(compose["services"]) >= SERVICES


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    """Every image names a version: no ``latest``, no bare name, no major-only tag."""
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name}: no image"
        _, _, tag = image.rpartition(":")
        assert ":" in image, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
        assert re.match(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a minor version at least"


def test_compose_servers_have_healthchecks_and_dependents_wait_for_them(compose: dict[str, Any]) -> None:
    """Redis, RabbitMQ and the upstream are health-checked; everything else starts once they are healthy."""
    services = compose["services"]
    for name in ("redis", "rabbitmq", "upstream"):
        check = services[name].get("healthcheck") or {}
        assert check.get("test"), f"{name}: no healthcheck"
    for name in ("celery-worker", "dramatiq-worker", "producer"):
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert "redis" in depends, name
        assert "upstream" in depends, name
        for server in ("redis", "rabbitmq", "upstream"):
            if server in depends:
                assert depends[server] == {"condition": "service_healthy"}, f"{name} -> {server}"


def test_compose_runs_the_readme_commands(compose: dict[str, Any]) -> None:
    """The Python services run the commands the README documents (``python examples/X.py [command]``)."""
    readme = README.read_text("utf-8")
    for name in ("upstream", "celery-worker", "dramatiq-worker", "producer"):
        command = compose["services"][name]["command"]
        text = " ".join(command) if isinstance(command, list) else command
        invocations = re.findall(r"python (examples/\w+\.py(?: (?:worker|produce))?)", text)
        assert invocations, f"{name}: runs no example"
        for invocation in invocations:
            assert f"python {invocation}" in readme, f"{name}: `python {invocation}` is not in the README"


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_file() -> None:
    """``docker compose config -q`` (or the older ``docker-compose``) validates the file, with the profile."""
    cli_args = _compose_cli()
    if cli_args is None:
        pytest.skip("docker compose is not installed; the structure tests above still ran")
    for extra in ([], ["--profile", "examples"]):
        completed = subprocess.run(
            [*cli_args, "-f", str(COMPOSE), *extra, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
