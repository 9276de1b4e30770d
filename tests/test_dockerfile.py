"""The Dockerfile, checked without a Docker engine: pinned bases, a non-root user, a build
context that really builds both distributions, and the image's own ENTRYPOINT, CMD and
HEALTHCHECK run against a real server.

`dockerfile_problems` reads the file the way `docker build` does (line continuations,
global ARGs substituted into FROM, JSON and shell forms) and lists what is wrong;
the unit tests at the top feed it bad Dockerfiles, so each check is seen to fail.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from raptorflow.data.server import cli, config
from server_process import (
    command_environment,
    free_port,
    run_command,
    wait_until_serving,
)
from tokens import TEST_JWT_SECRET

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTION = "raptorflow-data"
# Where `pip install` put this environment's console scripts (the image's /opt/venv/bin).
SCRIPTS = Path(sys.executable).parent

# -- reading a Dockerfile ---------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper case: FROM, RUN, COPY..."""
    arguments: str
    """The rest of the logical line, continuations joined."""
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form's argv (["a", "b"]), or None for the shell form."""
        text = self.arguments.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        return None

    def words(self) -> list[str]:
        """The arguments as argv: the JSON form's items, or the shell form split like sh."""
        argv = self.exec_form()
        return argv if argv is not None else shlex.split(self.arguments)


@dataclass
class Stage:
    image: str
    """The FROM reference with ARGs substituted (an image, or an earlier stage's name)."""
    name: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined (comment
    lines inside a continued instruction are skipped, as BuildKit does)."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        logical = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, arguments = logical.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return result


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::?-([^}]*))?\}|(\w+))")


def substitute(text: str, values: dict[str, str]) -> str:
    """$NAME, ${NAME} and ${NAME:-default} as the build expands them in FROM."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = values.get(name, "")
        return default if not value and default is not None else value

    return _VARIABLE.sub(replace, text)


def stages(text: str, build_args: dict[str, str] | None = None) -> list[Stage]:
    """The build stages, with the ARGs declared before the first FROM substituted."""
    values: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "ARG" and not result:
            name, _, default = instruction.arguments.partition("=")
            values[name.strip()] = (build_args or {}).get(name.strip(), default.strip())
        elif instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            image = substitute(words[0], values)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            result.append(Stage(image, name, instruction.line))
        elif result:
            result[-1].instructions.append(instruction)
        elif instruction.keyword not in {"ARG"}:
            raise ValueError(f"line {instruction.line}: {instruction.keyword} before any FROM")
    return result


_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# A full release version first: 3.11.14, 3.11.14-slim-bookworm; not 3, 3.11, latest, slim.
_FULL_VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+([-_.][\w.-]+)?$")


def pinned(image: str) -> bool:
    """Whether an image reference names one release: a digest, or a full x.y.z tag."""
    if _DIGEST.search(image):
        return True
    last = image.rsplit("/", 1)[-1]
    _, colon, tag = last.partition(":")
    return bool(colon) and bool(_FULL_VERSION_TAG.match(tag))


# -- .dockerignore, as moby/patternmatcher reads it -------------------------------------


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool
    """A `!` line: re-includes what earlier lines excluded."""


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            if pattern.startswith("**/", i):
                out += "(.*/)?"
                i += 3
            else:
                out += ".*"
                i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i)
            out += pattern[i : end + 1] if end > i else re.escape(char)
            i = end if end > i else i
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + "$")


def ignore_patterns(text: str) -> list[IgnorePattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        line = line.removeprefix("!").strip()
        # Docker cleans each pattern like a path: no leading or trailing slash, no "./".
        cleaned = str(Path("/" + line)).lstrip("/") if line not in {".", "/"} else "."
        patterns.append(IgnorePattern(_pattern_regex(cleaned), exclusion))
    return patterns


def ignored(path: str, patterns: Sequence[IgnorePattern]) -> bool:
    """Whether a context path (relative, '/'-separated) is left out of the build context.

    The last matching line wins; a line matches a path or any of its parent directories.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        if any(pattern.regex.match(candidate) for candidate in candidates):
            excluded = not pattern.exclusion
    return excluded


def context_files(root: Path, patterns: Sequence[IgnorePattern]) -> Iterator[str]:
    """The files `docker build root` sends, relative to root."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] in {".git", ".venv"}:
            continue
        if path.is_file() and not ignored(relative, patterns):
            yield relative


# -- the checks ---------------------------------------------------------------------------


def declared_scripts(pyproject: Path) -> dict[str, str]:
    with pyproject.open("rb") as file:
        scripts: dict[str, str] = tomllib.load(file)["project"]["scripts"]
    return scripts


def installed_scripts(distribution: str) -> dict[str, str]:
    return {
        entry.name: entry.value
        for entry in importlib.metadata.distribution(distribution).entry_points
        if entry.group == "console_scripts"
    }


def command_problems(argv: Sequence[str], scripts: dict[str, str], what: str) -> list[str]:
    """An argv must start with a declared console script, and its real CLI must accept the rest."""
    if not argv:
        return [f"{what}: no command"]
    if argv[0] not in scripts:
        return [f"{what}: {argv[0]!r} is not a console script of {DISTRIBUTION}"]
    try:
        cli._parser().parse_args(list(argv[1:]))
    except SystemExit:
        return [f"{what}: `{shlex.join(argv)}` is refused by the raptorflow-data CLI"]
    return []


def _user_of(stage: Stage) -> str:
    user = stage.last("USER")
    return user.arguments.split(":")[0].strip() if user else "root"


def _healthcheck_argv(stage: Stage) -> tuple[dict[str, str], list[str]] | None:
    """HEALTHCHECK's options (--interval=10s...) and its CMD, exec form only."""
    health = stage.last("HEALTHCHECK")
    if health is None:
        return None
    options: dict[str, str] = {}
    rest = health.arguments
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option.partition("=")
        options[name.removeprefix("--")] = value
        rest = rest.strip()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        return options, []
    argv = Instruction("CMD", command, health.line).exec_form()
    return options, argv or []


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    if match is None:
        raise ValueError(f"not a Docker duration: {duration!r}")
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def image_argv(stage: Stage) -> list[str]:
    """What the container runs: ENTRYPOINT followed by CMD (exec forms)."""
    entrypoint = stage.last("ENTRYPOINT")
    command = stage.last("CMD")
    return [*(entrypoint.words() if entrypoint else []), *(command.words() if command else [])]


def image_environment(stage: Stage) -> dict[str, str]:
    """The final stage's ENV, `KEY=value` pairs (several per line) as docker reads them."""
    environment: dict[str, str] = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                key, _, value = word.partition("=")
                environment[key] = value
    return environment


def healthcheck_address(argv: Sequence[str]) -> str:
    namespace = cli._parser().parse_args(list(argv[1:]))
    address: str = namespace.address
    return address


def listen_address(argv: Sequence[str], environment: dict[str, str]) -> str:
    """The gRPC address `serve` binds: its --listen flag, else RAPTORFLOW_LISTEN, else the
    default (flags win over the environment)."""
    namespace = cli._parser().parse_args(list(argv[1:]))
    settings = config.load(namespace, environment)
    return settings.listen


def dockerfile_problems(
    text: str,
    ignore_text: str,
    repo: Path,
    scripts: dict[str, str],
) -> list[str]:
    """Everything wrong with a Dockerfile, as sentences; empty when it passes."""
    problems: list[str] = []
    try:
        built = stages(text)
    except ValueError as exc:
        return [str(exc)]
    if not built:
        return ["no FROM"]
    names = {stage.name for stage in built if stage.name}
    patterns = ignore_patterns(ignore_text)
    for stage in built:
        if stage.image not in names and not pinned(stage.image):
            problems.append(
                f"line {stage.line}: FROM {stage.image!r} is not pinned "
                "(use a full x.y.z version tag or a digest)"
            )
        for instruction in stage.instructions:
            if instruction.keyword not in {"COPY", "ADD"}:
                continue
            if any(w.startswith("--from") for w in instruction.words()):
                continue  # from another stage or image, not from the context
            words = [w for w in instruction.words() if not w.startswith("--")]
            for source in words[:-1]:
                matches = [p for p in repo.glob(source) if p.exists()] if source != "." else [repo]
                if not matches:
                    problems.append(f"line {instruction.line}: COPY source {source!r} is missing")
                elif source != "." and all(
                    ignored(p.relative_to(repo).as_posix(), patterns) for p in matches
                ):
                    problems.append(
                        f"line {instruction.line}: COPY source {source!r} is excluded "
                        "by .dockerignore"
                    )
    final = built[-1]
    user = _user_of(final)
    if user in {"root", "0"}:
        problems.append("the final stage runs as root (add USER with a numeric uid)")
    elif not user.isdigit():
        problems.append(f"USER {user!r} is not numeric: runAsNonRoot cannot verify a name")
    argv = image_argv(final)
    problems += command_problems(argv, scripts, "ENTRYPOINT + CMD")
    if argv[1:2] != ["serve"]:
        problems.append(f"ENTRYPOINT + CMD runs {shlex.join(argv)!r}, not `serve`")
    environment = image_environment(final)
    known = {setting.env for setting in config.SETTINGS}
    for key in environment:
        if (key.startswith("RAPTORFLOW_") or key == "DATABASE_URL") and key not in known:
            problems.append(f"ENV {key} is not a setting of raptorflow.data.server.config")
    health = _healthcheck_argv(final)
    if health is None:
        return [*problems, "no HEALTHCHECK in the final stage"]
    options, health_argv = health
    if not health_argv:
        return [*problems, 'HEALTHCHECK is not `CMD ["raptorflow-data", "health", ...]`']
    problems += command_problems(health_argv, scripts, "HEALTHCHECK")
    if problems:
        return problems
    if health_argv[1] != "health":
        problems.append(f"HEALTHCHECK runs {health_argv[1]!r}, not the `health` command")
        return problems
    probed = _port(healthcheck_address(health_argv))
    served = _port(listen_address(argv, environment))
    if probed != served:
        problems.append(f"HEALTHCHECK probes port {probed}, but the server listens on {served}")
    probe_timeout = cli._parser().parse_args(health_argv[1:]).timeout
    if "timeout" in options and probe_timeout >= _seconds(options["timeout"]):
        problems.append("the health command's --timeout must be under HEALTHCHECK --timeout")
    # The server listens only once the database answered (up to connect_retry_seconds).
    start_period = _seconds(options.get("start-period", "0s"))
    if start_period < config.Settings().connect_retry_seconds:
        problems.append("HEALTHCHECK --start-period is shorter than connect_retry_seconds")
    return problems


def _read(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def _final_stage() -> Stage:
    return stages(_read("Dockerfile"))[-1]


# -- unit tests of the checks themselves -------------------------------------------------

GOOD = """\
# syntax=docker/dockerfile:1
ARG BASE=python:3.11.14-slim-bookworm
FROM ${BASE} AS build
COPY . .
RUN pip install \\
    ./stubs .
FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
ENV RAPTORFLOW_LISTEN=0.0.0.0:50051
USER 10001:10001
HEALTHCHECK --timeout=5s --start-period=40s \\
    CMD ["raptorflow-data", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["raptorflow-data"]
CMD ["serve"]
"""
IGNORE_ALL_BUT_SOURCES = "*\n!pyproject.toml\n!server/\n!stubs/\n**/__pycache__\n"


def problems_of(text: str, ignore_text: str = IGNORE_ALL_BUT_SOURCES) -> list[str]:
    return dockerfile_problems(text, ignore_text, REPO, declared_scripts(REPO / "pyproject.toml"))


def test_the_checks_pass_a_good_dockerfile() -> None:
    assert problems_of(GOOD) == []
    build = stages(GOOD)[0]
    # The continuation joined; the ARG substituted into FROM.
    assert build.image == "python:3.11.14-slim-bookworm"
    assert build.instructions[1].arguments == "pip install ./stubs ."


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("ARG BASE=python:3.11.14-slim-bookworm", "ARG BASE=python:3.11-slim"), "not pinned"),
        (("ARG BASE=python:3.11.14-slim-bookworm", "ARG BASE=python"), "not pinned"),
        (("ARG BASE=python:3.11.14-slim-bookworm", "ARG BASE=python:latest"), "not pinned"),
        (("ARG BASE=python:3.11.14-slim-bookworm", "ARG BASE=python:3-slim"), "not pinned"),
        (("FROM ${BASE}\nCOPY --from", "FROM python:3.12-slim\nCOPY --from"), "not pinned"),
        (("USER 10001:10001\n", ""), "runs as root"),
        (("USER 10001:10001", "USER 0"), "runs as root"),
        (("USER 10001:10001", "USER root:root"), "runs as root"),
        (("USER 10001:10001", "USER raptorflow"), "not numeric"),
        (("COPY . .", "COPY LICENSE.txt ."), "'LICENSE.txt' is missing"),
        (("COPY . .", "COPY Makefile ."), "'Makefile' is excluded by .dockerignore"),
        (('"health"', '"healthz"'), "refused by the raptorflow-data CLI"),
        (('["raptorflow-data", "health"', '["grpc_health_probe", "health"'), "not a console"),
        (('"--timeout", "3"', '"--service", "readiness", "--deadline", "3"'), "refused"),
        (('"127.0.0.1:50051"', '"127.0.0.1:8080"'), "probes port 8080, but the server"),
        (("RAPTORFLOW_LISTEN=0.0.0.0:50051", "RAPTORFLOW_LISTEN=0.0.0.0:9000"), "listens on 9000"),
        (("RAPTORFLOW_LISTEN=", "RAPTORFLOW_LISTEN_ADDRESS="), "not a setting"),
        (('CMD ["serve"]', 'CMD ["serve", "--listen-on", "0.0.0.0:50051"]'), "refused"),
        (('CMD ["serve"]', 'CMD ["migrate"]'), "not `serve`"),
        (('"--timeout", "3"', '"--timeout", "5"'), "under HEALTHCHECK --timeout"),
        (("--start-period=40s", "--start-period=5s"), "shorter than connect_retry_seconds"),
        (
            ("HEALTHCHECK --timeout=5s --start-period=40s \\\n    CMD", "LABEL x=y\nRUN"),
            "no HEALTH",
        ),
    ],
)
def test_the_checks_find_what_is_wrong(change: tuple[str, str], problem: str) -> None:
    old, new = change
    assert old in GOOD
    found = problems_of(GOOD.replace(old, new))
    assert any(problem in p for p in found), found


def test_a_digest_pins_and_stage_names_need_no_pin() -> None:
    digest = "python@sha256:" + "a" * 64
    assert pinned(digest)
    assert pinned("python:3.11-slim@sha256:" + "0" * 64)
    assert pinned("registry.example.com:5000/team/python:3.11.14-slim")
    assert not pinned("registry.example.com:5000/team/python")
    assert not pinned("python@sha256:abc")
    assert problems_of(GOOD.replace("python:3.11.14-slim-bookworm", digest)) == []
    text = GOOD.replace("FROM ${BASE}\nCOPY --from", "FROM build\nCOPY --from")
    assert problems_of(text) == []


def test_continuations_and_substitution() -> None:
    parsed = instructions("RUN a \\\n  # a comment inside\n  b \\\n  c\nUSER 1\n")
    assert [(i.keyword, i.arguments, i.line) for i in parsed] == [
        ("RUN", "a b c", 1),
        ("USER", "1", 5),
    ]
    with pytest.raises(ValueError, match="ends inside"):
        instructions("RUN a \\\n")
    assert substitute("${A}:${B:-x}-$C", {"A": "py", "C": "z"}) == "py:x-z"
    assert stages("ARG B=img:1\nFROM $B\n", {"B": "other:1.2.3"})[0].image == "other:1.2.3"


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("Makefile", True),
        ("tests/conftest.py", True),
        (".git/HEAD", True),
        ("pyproject.toml", False),
        ("server/raptorflow/data/server/cli.py", False),
        ("server/raptorflow/data/server/__pycache__/cli.cpython-311.pyc", True),
        ("stubs/raptorflow/data/v1/query_pb2.py", False),
        ("stubs/raptorflow_data_stubs.egg-info/PKG-INFO", True),
    ],
)
def test_dockerignore_matching(path: str, excluded: bool) -> None:
    assert ignored(path, ignore_patterns(_read(".dockerignore"))) is excluded


# -- the repository's Dockerfile ---------------------------------------------------------


def test_the_dockerfile_passes_every_check() -> None:
    scripts = declared_scripts(REPO / "pyproject.toml")
    assert dockerfile_problems(_read("Dockerfile"), _read(".dockerignore"), REPO, scripts) == []


def test_the_healthcheck_and_entrypoint_commands_are_installed_entry_points() -> None:
    final = _final_stage()
    health = _healthcheck_argv(final)
    assert health is not None
    _, health_argv = health
    declared = declared_scripts(REPO / "pyproject.toml")
    installed = installed_scripts(DISTRIBUTION)
    for argv in (health_argv, image_argv(final)):
        # Declared by the project and really installed, pointing at the same function.
        assert declared[argv[0]] == installed[argv[0]] == "raptorflow.data.server.cli:main"
        assert shutil.which(argv[0], path=str(SCRIPTS)), f"{argv[0]} not in {SCRIPTS}"
    assert health_argv[1] == "health"


def test_the_build_context_builds_both_distributions(tmp_path: Path) -> None:
    """The files .dockerignore lets through are enough for `pip install ./stubs .`: both
    wheels build from a copy of exactly that context, with the server's migrations and
    entry point and the generated stubs inside."""
    patterns = ignore_patterns(_read(".dockerignore"))
    context = tmp_path / "context"
    sent = list(context_files(REPO, patterns))
    assert "pyproject.toml" in sent
    assert not [f for f in sent if f.startswith(("tests/", ".git/", "bench/"))]
    for relative in sent:
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    wheels = tmp_path / "wheels"
    # The image's `pip install ./stubs .`, minus the downloads: no index, no isolation.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(wheels),
            "./stubs",
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    by_name = {w.name.split("-")[0]: w for w in wheels.glob("*.whl")}
    assert set(by_name) == {"raptorflow_data", "raptorflow_data_stubs"}
    with zipfile.ZipFile(by_name["raptorflow_data"]) as wheel:
        names = wheel.namelist()
        assert "raptorflow/data/server/cli.py" in names
        assert any(n.startswith("raptorflow/data/server/db/migrations/0001") for n in names)
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert (
            "raptorflow-data = raptorflow.data.server.cli:main" in wheel.read(entry_points).decode()
        )
    with zipfile.ZipFile(by_name["raptorflow_data_stubs"]) as wheel:
        assert "raptorflow/data/v1/workspace_service_pb2_grpc.py" in wheel.namelist()


async def test_the_image_commands_run_against_a_real_server(database_url: str) -> None:
    """ENTRYPOINT + CMD with the image's ENV start a server that serves; the HEALTHCHECK
    command then exits 0 against it, and 2 where nothing listens. Only the port differs
    from the image (a free one), and the database and token secret come from the test."""
    final = _final_stage()
    health = _healthcheck_argv(final)
    assert health is not None
    _, health_argv = health
    argv = image_argv(final)
    port = free_port()
    address = f"127.0.0.1:{port}"
    environment = {
        **command_environment(),
        **{k: v for k, v in image_environment(final).items() if k != "PATH"},
        "PATH": f"{SCRIPTS}:{command_environment().get('PATH', '')}",
        "RAPTORFLOW_LISTEN": address,
        "DATABASE_URL": database_url,
        "RAPTORFLOW_JWT_SECRET": TEST_JWT_SECRET.decode(),
    }
    executable = shutil.which(argv[0], path=str(SCRIPTS))
    assert executable
    process = await asyncio.create_subprocess_exec(
        executable,
        *argv[1:],
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        try:
            await wait_until_serving(process, address, within=45.0)
        except AssertionError:
            process.kill()
            _, stderr = await process.communicate()
            raise AssertionError(stderr.decode()[-3000:]) from None
        probe = [executable, *_with_address(health_argv[1:], address)]
        served = await run_command(*probe, env=environment)
        assert served.returncode == 0, served
        nowhere = [executable, *_with_address(health_argv[1:], f"127.0.0.1:{free_port()}")]
        refused = await run_command(*nowhere, env=environment)
        assert refused.returncode == 2, refused
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(30):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]


def _with_address(arguments: Sequence[str], address: str) -> list[str]:
    replaced = list(arguments)
    index = replaced.index("--address")
    replaced[index + 1] = address
    return replaced
