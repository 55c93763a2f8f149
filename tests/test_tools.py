"""Tests of the tools package: real files under tmp_path, real subprocesses, tools invoked the LangChain way."""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from langchain_core.tools import BaseTool, ToolException
from pydantic import ValidationError

from selftune.settings import PROJECT_ROOT, ConfigError, ToolSettings
from selftune.tools.calculator import MAX_EXPRESSION_CHARS, CalculatorTool
from selftune.tools.finish import FINISH_TOOL, FinishTool
from selftune.tools.memory_tools import FACT_KIND, MemorySaveTool, MemorySearchTool, MemoryStore
from selftune.tools.python_exec import PythonTool
from selftune.tools.registry import BUILTIN_TOOLS, ToolContext, build_tools
from selftune.tools.workspace import ListFilesTool, ReadFileTool, WriteFileTool

HELPERS = "test_tools_extras"


# --- calculator -----------------------------------------------------------------------------

@pytest.fixture
def calc() -> CalculatorTool:
    return CalculatorTool()


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("17*23+4", "395"),
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("2**3**2", "512"),
        ("-2**2", "-4"),
        ("+-3", "-3"),
        ("7/2", "3.5"),
        ("10/2", "5"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7%3", "1"),
        ("2**-1", "0.5"),
        ("1.5e3", "1500"),
        ("  2 * (3 + 4)  ", "14"),
        ("10**20", "100000000000000000000"),
        ("sqrt(16)", "4"),
        ("sqrt(2)", repr(math.sqrt(2))),
        ("log(e)", "1"),
        ("log(8, 2)", "3"),
        ("log10(1000)", "3"),
        ("exp(0)", "1"),
        ("sin(0) + cos(0)", "1"),
        ("tan(0)", "0"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("abs(-4)", "4"),
        ("round(2.567, 2)", "2.57"),
        ("round(2.5)", "2"),
        ("min(4, 2, 8)", "2"),
        ("max(4, 2, 8)", "8"),
        ("2*pi", repr(2 * math.pi)),
    ],
)
def test_calculator_evaluates(calc: CalculatorTool, expression: str, expected: str) -> None:
    assert calc.invoke({"expression": expression}) == expected


@pytest.mark.parametrize("expression", ["1/0", "5//0", "5%0", "0**-1", "1.0/0.0"])
def test_calculator_division_by_zero(calc: CalculatorTool, expression: str) -> None:
    with pytest.raises(ToolException, match="division by zero"):
        calc.invoke({"expression": expression})


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "only these functions"),
        ("__import__('os').system('echo hacked')", "only these functions"),
        ("(1).real", "unsupported syntax: Attribute"),
        ("math.sqrt(4)", "only these functions"),
        ("open('x')", "only these functions"),
        ("x + 1", "unknown name 'x'"),
        ("__builtins__", "unknown name"),
        ("sqrt(x=4)", "keyword arguments"),
        ("'a' * 3", "is not a number"),
        ("True + 1", "is not a number"),
        ("2j", "is not a number"),
        ("[1, 2]", "unsupported syntax: List"),
        ("1, 2", "unsupported syntax: Tuple"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("1 if 1 else 2", "unsupported syntax: IfExp"),
        ("1 < 2", "unsupported syntax: Compare"),
        ("2 ^ 3", r"use \*\* for powers"),
        ("1 +", "invalid expression"),
        ("import os", "invalid expression"),
        ("", "empty"),
        ("1\x00", "invalid expression"),
    ],
)
def test_calculator_refuses(calc: CalculatorTool, expression: str, message: str) -> None:
    with pytest.raises(ToolException, match=message):
        calc.invoke({"expression": expression})


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("9**9**9", "exponent .* too large"),
        ("2**100000", "exponent .* too large"),
        ("10**5000", "result is too large"),
        ("(10**999)**11", "result is too large"),
        ("(10**999) * (10**999) * (10**999) * (10**999)", "result is too large"),
        ("1e308 * 10", "not a finite number"),
        ("exp(1000)", "cannot evaluate"),
        ("sqrt(-1)", "cannot evaluate"),
        ("log(0)", "cannot evaluate"),
        ("(-8) ** 0.5", "complex"),
        ("round(5, -1000000)", "digits"),
        ("min()", "cannot evaluate"),
        ("sqrt(1, 2)", "cannot evaluate"),
        ("1+" * 300 + "1", f"longer than {MAX_EXPRESSION_CHARS}"),
        ("(" * 240 + "1" + ")" * 240, "invalid expression"),
    ],
)
def test_calculator_guards_against_huge_or_bad_work(calc: CalculatorTool, expression: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ToolException, match=message):
        calc.invoke({"expression": expression})
    assert time.monotonic() - started < 2


def test_calculator_validates_arguments(calc: CalculatorTool) -> None:
    with pytest.raises(ValidationError):
        calc.invoke({"expr": "1+1"})


# --- workspace ----------------------------------------------------------------------------

@dataclass
class Files:
    read: ReadFileTool
    write: WriteFileTool
    list: ListFilesTool
    root: Path
    outside: Path


def _file_tools(root: Path, outside: Path, max_file_bytes: int = 1_000) -> Files:
    kwargs = {"root": root, "max_file_bytes": max_file_bytes}
    return Files(ReadFileTool(**kwargs), WriteFileTool(**kwargs), ListFilesTool(**kwargs), root, outside)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    root = tmp_path / "workspace"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    return _file_tools(root, outside)


def test_workspace_roundtrip(files: Files) -> None:
    text = "héllo\nwörld\n"
    result = files.write.invoke({"path": "notes/day1/todo.txt", "content": text})
    assert result == f"wrote {len(text.encode())} bytes to notes/day1/todo.txt"
    assert (files.root / "notes" / "day1" / "todo.txt").read_text(encoding="utf-8") == text
    assert files.read.invoke({"path": "notes/day1/todo.txt"}) == text
    files.write.invoke({"path": "a.txt", "content": "first"})
    files.write.invoke({"path": "a.txt", "content": "second"})
    assert files.read.invoke({"path": "./a.txt"}) == "second"
    assert files.list.invoke({}) == "a.txt\nnotes/"
    assert files.list.invoke({"path": "notes"}) == "day1/"
    assert files.list.invoke({"path": "notes/day1"}) == "todo.txt"


def test_workspace_absolute_path_inside_is_allowed(files: Files) -> None:
    (files.root / "in.txt").write_text("inside")
    assert files.read.invoke({"path": str(files.root / "in.txt")}) == "inside"


def test_workspace_root_is_created_on_first_write(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    tools = _file_tools(root, tmp_path)
    assert tools.list.invoke({"path": "."}) == "(empty folder)"
    assert not root.exists()
    tools.write.invoke({"path": "x.txt", "content": "1"})
    assert (root / "x.txt").read_text() == "1"


@pytest.mark.parametrize("path", ["../outside/secret.txt", "notes/../../outside/secret.txt", ".."])
def test_workspace_refuses_dotdot(files: Files, path: str) -> None:
    with pytest.raises(ToolException, match="'..'"):
        files.read.invoke({"path": path})
    with pytest.raises(ToolException, match="'..'"):
        files.write.invoke({"path": path, "content": "pwned"})
    with pytest.raises(ToolException, match="'..'"):
        files.list.invoke({"path": path})
    assert (files.outside / "secret.txt").read_text() == "top secret"


def test_workspace_refuses_absolute_path_outside(files: Files) -> None:
    secret = files.outside / "secret.txt"
    with pytest.raises(ToolException, match="outside the workspace"):
        files.read.invoke({"path": str(secret)})
    with pytest.raises(ToolException, match="outside the workspace"):
        files.write.invoke({"path": str(files.outside / "new.txt"), "content": "pwned"})
    with pytest.raises(ToolException, match="outside the workspace"):
        files.list.invoke({"path": "/"})
    assert not (files.outside / "new.txt").exists()


def test_workspace_refuses_symlink_escapes(files: Files) -> None:
    secret = files.outside / "secret.txt"
    (files.root / "dir_link").symlink_to(files.outside, target_is_directory=True)
    (files.root / "file_link").symlink_to(secret)
    (files.root / "dangling").symlink_to(files.outside / "created.txt")

    for path in ["dir_link/secret.txt", "file_link"]:
        with pytest.raises(ToolException, match="outside the workspace"):
            files.read.invoke({"path": path})
    for path in ["dir_link/new.txt", "file_link", "dangling"]:
        with pytest.raises(ToolException, match="outside the workspace"):
            files.write.invoke({"path": path, "content": "pwned"})
    with pytest.raises(ToolException, match="outside the workspace"):
        files.list.invoke({"path": "dir_link"})

    assert secret.read_text() == "top secret"
    assert sorted(entry.name for entry in files.outside.iterdir()) == ["secret.txt"]


def test_workspace_allows_symlink_inside(files: Files) -> None:
    (files.root / "real").mkdir()
    (files.root / "alias").symlink_to(files.root / "real", target_is_directory=True)
    files.write.invoke({"path": "alias/f.txt", "content": "via alias"})
    assert (files.root / "real" / "f.txt").read_text() == "via alias"
    assert files.read.invoke({"path": "alias/f.txt"}) == "via alias"


def test_workspace_size_limits(tmp_path: Path) -> None:
    tools = _file_tools(tmp_path, tmp_path, max_file_bytes=10)
    assert tools.write.invoke({"path": "ok.txt", "content": "x" * 10}) == "wrote 10 bytes to ok.txt"
    assert tools.read.invoke({"path": "ok.txt"}) == "x" * 10
    with pytest.raises(ToolException, match="over the limit of 10 bytes"):
        tools.write.invoke({"path": "big.txt", "content": "x" * 11})
    with pytest.raises(ToolException, match="over the limit"):
        tools.write.invoke({"path": "big.txt", "content": "é" * 6})  # 6 characters, 12 bytes
    assert not (tmp_path / "big.txt").exists()
    (tmp_path / "huge.txt").write_bytes(b"y" * 11)
    with pytest.raises(ToolException, match="larger than the limit of 10 bytes"):
        tools.read.invoke({"path": "huge.txt"})


def test_workspace_clear_errors(files: Files) -> None:
    (files.root / "folder").mkdir()
    (files.root / "file.txt").write_text("x")
    cases = [
        (files.read, {"path": "missing.txt"}, "does not exist"),
        (files.read, {"path": "folder"}, "is a folder"),
        (files.read, {"path": "bad\x00name"}, "invalid path"),
        (files.list, {"path": "missing"}, "does not exist"),
        (files.list, {"path": "file.txt"}, "is a file"),
        (files.write, {"path": "folder", "content": "x"}, "is a folder"),
        (files.write, {"path": ".", "content": "x"}, "is a folder"),
        (files.write, {"path": "file.txt/inner.txt", "content": "x"}, "cannot write"),
    ]
    for tool, arguments, message in cases:
        with pytest.raises(ToolException, match=message):
            tool.invoke(arguments)
    with pytest.raises(ValidationError):
        files.write.invoke({"path": "no-content.txt"})


# --- python ---------------------------------------------------------------------------------

def _process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_python_runs_code_and_captures_output() -> None:
    result = PythonTool().invoke({"code": "import sys\nprint(17 * 23)\nprint('oops', file=sys.stderr)"})
    assert result == "exit code 0\nstdout:\n391\nstderr:\noops"


def test_python_reports_errors_as_output() -> None:
    result = PythonTool().invoke({"code": "raise ValueError('boom')"})
    assert result.startswith("exit code 1\nstdout:\n")
    assert "ValueError: boom" in result


def test_python_truncates_output() -> None:
    result = PythonTool(max_output_chars=100).invoke({"code": "print('a' * 500 + 'END')"})
    assert "characters truncated" in result
    assert result.rstrip().endswith("END")
    assert len(result) < 300


def test_python_timeout_kills_process_group() -> None:
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(os.getpid(), child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(ToolException, match="timed out after 2 seconds") as raised:
        PythonTool(timeout_s=2).invoke({"code": code})
    assert time.monotonic() - started < 15
    printed = re.search(r"stdout so far:\n(\d+) (\d+)", str(raised.value))
    assert printed, f"partial output missing from: {raised.value}"
    pids = [int(pid) for pid in printed.groups()]
    deadline = time.monotonic() + 5
    while any(_process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_process_alive(pid) for pid in pids)


def test_python_memory_limit() -> None:
    tool = PythonTool(memory_mb=256)
    small = tool.invoke({"code": "data = bytearray(50 * 1024 * 1024)\nprint('ok', len(data))"})
    assert small.startswith("exit code 0\nstdout:\nok 52428800")
    big = tool.invoke({"code": "data = bytearray(2 * 1024 ** 3)\nprint('allocated')"})
    assert big.startswith("exit code 1\n")
    assert "MemoryError" in big
    assert "allocated" not in big


def test_python_environment_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFTUNE_SECRET_TEST", "s3cret-value")
    result = PythonTool().invoke({"code": "import json, os\nprint(json.dumps(dict(os.environ)))"})
    assert result.startswith("exit code 0\n")
    environment = json.loads(result.split("stdout:\n", 1)[1])
    assert "SELFTUNE_SECRET_TEST" not in environment
    assert "s3cret-value" not in result
    assert set(environment) <= {"PATH", "HOME", "LC_CTYPE"}  # LC_CTYPE: Python's own C-locale coercion


def test_python_runs_in_fresh_temp_dir() -> None:
    code = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))"
    first = PythonTool().invoke({"code": code}).split("stdout:\n", 1)[1].splitlines()
    second = PythonTool().invoke({"code": code}).split("stdout:\n", 1)[1].splitlines()
    workdir = Path(first[0])
    assert workdir.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not workdir.is_relative_to(PROJECT_ROOT) and workdir != Path.cwd()
    assert first[1] == second[1] == "['scratch.txt']"  # nothing left over from the first run
    assert first[0] != second[0]
    assert not workdir.exists()


# --- memory tools -----------------------------------------------------------------------------

@dataclass
class FakeHit:
    text: str
    kind: str
    episode_id: str | None
    distance: float


class FakeMemory:
    """Keeps texts in a list; search ranks by how many query words a text contains."""

    def __init__(self) -> None:
        self.items: list[FakeHit] = []
        self.searches: list[tuple[str, int, str | None]] = []

    def add(self, texts: list[str], kind: str, episode_id: str | None = None, metadata: dict | None = None) -> list[str]:
        self.items.extend(FakeHit(text, kind, episode_id, 0.0) for text in texts)
        return [f"mem-{index}" for index in range(len(self.items) - len(texts), len(self.items))]

    def search(self, query: str, k: int = 3, kind: str | None = None) -> list[FakeHit]:
        self.searches.append((query, k, kind))
        words = set(query.lower().split())
        scored = []
        for item in self.items:
            overlap = len(words & set(item.text.lower().split()))
            if overlap and kind in (None, item.kind):
                scored.append(FakeHit(item.text, item.kind, item.episode_id, round(1 / (1 + overlap), 2)))
        return sorted(scored, key=lambda hit: hit.distance)[:k]


def test_fake_memory_satisfies_protocol() -> None:
    assert isinstance(FakeMemory(), MemoryStore)
    with pytest.raises(ValidationError):
        MemorySearchTool(memory=object())


def test_memory_save_and_search() -> None:
    memory = FakeMemory()
    save = MemorySaveTool(memory=memory, episode_id="ep-1")
    search = MemorySearchTool(memory=memory)
    assert save.invoke({"text": "  The capital of France is Paris.  "}) == "saved to memory"
    save.invoke({"text": "Paris has the Louvre"})
    assert [(item.text, item.kind, item.episode_id) for item in memory.items] == [
        ("The capital of France is Paris.", FACT_KIND, "ep-1"),
        ("Paris has the Louvre", FACT_KIND, "ep-1"),
    ]
    result = search.invoke({"query": "capital of France"})
    assert result == "1. [fact, distance 0.25] The capital of France is Paris."
    assert memory.searches[-1] == ("capital of France", 3, None)
    assert search.invoke({"query": "paris has", "k": 1}) == "1. [fact, distance 0.33] Paris has the Louvre"
    assert memory.searches[-1][1] == 1
    assert search.invoke({"query": "bananas"}) == "no matching memories"


def test_memory_tools_validate_input() -> None:
    memory = FakeMemory()
    save = MemorySaveTool(memory=memory)
    search = MemorySearchTool(memory=memory)
    for bad in [{"query": "x", "k": 0}, {"query": "x", "k": 1000}, {"query": ""}, {}]:
        with pytest.raises(ValidationError):
            search.invoke(bad)
    for bad in [{"text": ""}, {"text": "x" * 10_000}]:
        with pytest.raises(ValidationError):
            save.invoke(bad)
    with pytest.raises(ToolException, match="empty"):
        save.invoke({"text": "   "})
    with pytest.raises(ToolException, match="empty"):
        search.invoke({"query": "  "})
    assert memory.items == [] and memory.searches == []


# --- finish ---------------------------------------------------------------------------------

def test_finish_returns_answer() -> None:
    tool = FinishTool()
    assert tool.name == FINISH_TOOL == "finish"
    assert tool.invoke({"answer": "42 apples"}) == "42 apples"


# --- registry -------------------------------------------------------------------------------

def _context(tmp_path: Path, memory: FakeMemory | None = None, **settings: object) -> ToolContext:
    return ToolContext(
        workspace_dir=tmp_path / "workspace", memory=memory, episode_id="ep-7", settings=ToolSettings(**settings)
    )


@pytest.fixture
def helpers_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_build_default_tools(tmp_path: Path) -> None:
    tools = build_tools(_context(tmp_path, FakeMemory()))
    assert [tool.name for tool in tools] == list(ToolSettings().enabled)
    assert set(BUILTIN_TOOLS) == set(ToolSettings().enabled)
    assert not (tmp_path / "workspace").exists()  # building has no side effects


def test_build_skips_memory_tools_without_memory(tmp_path: Path) -> None:
    names = [tool.name for tool in build_tools(_context(tmp_path))]
    assert "memory_search" not in names and "memory_save" not in names
    assert "calculator" in names and names[-1] == FINISH_TOOL


def test_build_passes_settings_and_context(tmp_path: Path) -> None:
    memory = FakeMemory()
    context = _context(tmp_path, memory, max_file_bytes=5, python_timeout_s=2.5, python_memory_mb=64)
    tools = {tool.name: tool for tool in build_tools(context)}
    assert tools["read_file"].max_file_bytes == tools["write_file"].max_file_bytes == 5
    assert tools["list_files"].root == tmp_path / "workspace"
    assert (tools["python"].timeout_s, tools["python"].memory_mb) == (2.5, 64)
    with pytest.raises(ToolException, match="over the limit of 5 bytes"):
        tools["write_file"].invoke({"path": "a.txt", "content": "123456"})
    tools["memory_save"].invoke({"text": "remember me"})
    assert memory.items[0].episode_id == "ep-7"


def test_every_tool_argument_is_described(tmp_path: Path) -> None:
    for tool in build_tools(_context(tmp_path, FakeMemory())):
        schema = tool.tool_call_schema.model_json_schema()
        assert tool.description, tool.name
        assert schema["properties"], tool.name
        for argument, spec in schema["properties"].items():
            assert spec.get("description"), f"{tool.name}.{argument}"


def test_finish_always_included(tmp_path: Path) -> None:
    assert [tool.name for tool in build_tools(_context(tmp_path, enabled=["calculator"]))] == ["calculator", "finish"]
    assert [tool.name for tool in build_tools(_context(tmp_path, enabled=[]))] == ["finish"]
    assert [tool.name for tool in build_tools(_context(tmp_path, enabled=["finish", "calculator"]))] == [
        "finish", "calculator",
    ]


def test_unknown_builtin_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tool 'teleport'") as raised:
        build_tools(_context(tmp_path, enabled=["calculator", "teleport"]))
    assert all(name in str(raised.value) for name in BUILTIN_TOOLS)


def test_duplicate_names_are_refused(tmp_path: Path, helpers_on_path: None) -> None:
    with pytest.raises(ConfigError, match="'calculator'"):
        build_tools(_context(tmp_path, enabled=["calculator", "calculator"]))
    with pytest.raises(ConfigError, match="'calculator'"):
        build_tools(_context(tmp_path, enabled=["calculator"], extra=[f"{HELPERS}:calculator_clash"]))
    with pytest.raises(ConfigError, match="'echo'"):
        build_tools(_context(tmp_path, enabled=[], extra=[f"{HELPERS}:EchoTool", f"{HELPERS}:EchoTool"]))


def test_extra_tools_are_loaded(tmp_path: Path, helpers_on_path: None) -> None:
    extra = [f"{HELPERS}:shout", f"{HELPERS}:EchoTool", f"{HELPERS}:make_reverse_tool"]
    tools = build_tools(_context(tmp_path, enabled=["calculator"], extra=extra))
    assert [tool.name for tool in tools] == ["calculator", "shout", "echo", "reverse", "finish"]
    assert all(isinstance(tool, BaseTool) for tool in tools)
    by_name = {tool.name: tool for tool in tools}
    assert by_name["shout"].invoke({"text": "hi"}) == "HI"
    assert by_name["echo"].invoke({"text": "hi"}) == "hi"
    assert by_name["reverse"].invoke({"text": "abc"}) == "cba"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("no_colon_here", "expected 'module:attribute'"),
        (f"{HELPERS}:", "expected 'module:attribute'"),
        (":shout", "expected 'module:attribute'"),
        ("selftune_no_such_module_xyz:tool", "cannot import"),
        (f"{HELPERS}:missing", "has no attribute"),
        (f"{HELPERS}:NOT_A_TOOL", "expected a BaseTool"),
        (f"{HELPERS}:NotATool", "expected a BaseTool"),
        (f"{HELPERS}:make_not_a_tool", "returned str, not a BaseTool"),
        (f"{HELPERS}:make_failing_tool", "factory exploded"),
    ],
)
def test_bad_extra_tools(tmp_path: Path, helpers_on_path: None, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        build_tools(_context(tmp_path, extra=[entry]))
    assert repr(entry) in str(raised.value)
