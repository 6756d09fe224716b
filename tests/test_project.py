"""The documents match the script, and the project keeps its promises: stdlib only, one version,
CI runs the README's test command, every documented example works against a local server."""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import make_png

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "README.zh-CN.md", ROOT / "SKILL.md", *sorted((ROOT / "references").glob("*.md"))]
COMMAND_PREFIXES = ("python3 scripts/generate_image.py ", "python3 SKILL_DIR/scripts/generate_image.py ")


def code_block_lines(path: Path) -> list[str]:
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()]


def documented_commands() -> list[pytest.param]:
    found = []
    for path in DOCUMENTS:
        for line in code_block_lines(path):
            if line.startswith(COMMAND_PREFIXES):
                found.append(pytest.param(line, id=f"{path.name}:{line.split(' ', 2)[2][:40]}"))
    return found


def documented_batch_files() -> dict[str, str]:
    """Example batch files: a line "File `NAME.json`..." (文件 in Chinese) followed by a json or jsonl block."""
    found = {}
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for name, body in re.findall(r"^(?:File|文件) `([^`]+\.jsonl?)`[^\n]*\n+```jsonl?\n(.*?)^```", text, flags=re.S | re.M):
            found[name] = body
    return found


def batch_inputs(content: str) -> tuple[list[str], list[str]]:
    """The input images and masks a batch file names (JSON or JSONL; items and global)."""
    try:
        document = json.loads(content)
    except ValueError:
        document = [json.loads(line) for line in content.splitlines() if line.strip() and not line.startswith("#")]
    blocks = document.get("prompts", []) + [document.get("global", {})] if isinstance(document, dict) else document
    blocks = [b for b in blocks if isinstance(b, dict)]
    return [i for b in blocks for i in b.get("input_images", [])], [b["mask"] for b in blocks if "mask" in b]


def write_batch_file(folder: Path, name: str) -> None:
    content = documented_batch_files()[name]
    (folder / name).write_text(content, encoding="utf-8")
    images, masks = batch_inputs(content)
    for image in images:
        (folder / image).write_bytes(make_png(640, 480))
    for mask in masks:
        (folder / mask).write_bytes(make_png(640, 480, alpha=True))


def parser_long_flags() -> set[str]:
    """The flags a user sees; the worker's own --run-job is hidden."""
    return {opt for action in gi.build_parser()._actions for opt in action.option_strings
            if opt.startswith("--") and action.help != argparse.SUPPRESS}


def test_documents_have_commands_to_check() -> None:
    assert len(documented_commands()) >= 15


def input_images(words: list[str]) -> list[str]:
    """The values of every -i, which takes one or more paths."""
    names, taking = [], False
    for word in words:
        if word.startswith("-"):
            taking = word in ("-i", "--input-image")
        elif taking:
            names.append(word)
    return names


@pytest.mark.parametrize("line", documented_commands())
def test_documented_command_works_against_a_local_server(online: CliRunner, isolated: Path, line: str) -> None:
    words = shlex.split(line, comments=True)[2:]
    stdin = b""
    if "<" in words:
        position = words.index("<")
        stdin = "一张中秋节海报,写着「花好月圆」\n".encode()
        words = words[:position] + words[position + 2:]
    for name in input_images(words):
        (isolated / name).write_bytes(make_png(640, 480))
    if "-m" in words:
        (isolated / words[words.index("-m") + 1]).write_bytes(make_png(640, 480, alpha=True))
    if "--batch" in words:
        write_batch_file(isolated, words[words.index("--batch") + 1])
    if words[0] in ("--attach", "--list-jobs", "--cancel"):     # they act on a job made before
        assert online("-p", "an earlier image", "-f", "earlier.png").code == 0
    run = online(*words, stdin=stdin)
    assert run.code == 0, run.err
    if words[0] in ("--list-jobs", "--cancel"):
        assert "earlier" in run.out or " done" in run.out
        return
    if "--dry-run" in words:
        assert "POST " in run.out.splitlines()[0]
        return
    if "--json" in words:
        document = run.json()
        paths = [p for item in document.get("items", []) for p in item["paths"]] + \
            [f["path"] for f in document.get("files", [])]
    else:
        paths = run.out.splitlines()
    assert paths and all((isolated / p).is_file() for p in paths)


@pytest.mark.parametrize("name", sorted(documented_batch_files()))
def test_documented_batch_file_is_accepted_whole(online: CliRunner, api, isolated: Path, name: str) -> None:
    write_batch_file(isolated, name)
    run = online("--batch", name, "--dry-run", "--json")
    assert run.code == 0, run.err
    document = run.json()
    assert document["to_send"] == len(document["items"]) >= 3
    assert api.requests == []


def test_every_flag_in_help_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(flag for flag in parser_long_flags() if f"`{flag}" not in readme)
    assert missing == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_flag_the_documents_mention_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    commands = " ".join(line for line in code_block_lines(path) if line.startswith(COMMAND_PREFIXES))
    mentioned = set(re.findall(r"`(--[a-z][a-z-]*)", text)) | set(re.findall(r"\s(--[a-z][a-z-]*)", commands))
    assert sorted(mentioned - parser_long_flags()) == []


@pytest.mark.parametrize("name", ["README.md", "README.zh-CN.md", "SKILL.md"])
def test_exit_code_tables_match_the_script(name: str) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", text, flags=re.M)}
    defined = {value for key, value in vars(gi).items() if key.startswith("EXIT_")} | set(gi.SIGNAL_EXITS.values())
    assert documented == defined


def flag_table(path: Path) -> list[str]:
    return re.findall(r"^\| (`-[^|]+) \|", path.read_text(encoding="utf-8"), flags=re.M)


def test_the_chinese_readme_has_the_same_flags_commands_and_sections() -> None:
    english, chinese = ROOT / "README.md", ROOT / "README.zh-CN.md"
    assert flag_table(chinese) == flag_table(english) != []
    flags = [[w for w in line.split() if w.startswith("-")] for line in code_block_lines(english)
             if line.startswith(COMMAND_PREFIXES)]
    assert [[w for w in line.split() if w.startswith("-")] for line in code_block_lines(chinese)
            if line.startswith(COMMAND_PREFIXES)] == flags
    assert len(re.findall(r"^## ", chinese.read_text(encoding="utf-8"), flags=re.M)) == \
        len(re.findall(r"^## ", english.read_text(encoding="utf-8"), flags=re.M))
    assert readme_test_command(chinese) == readme_test_command(english)


def readme_test_command(path: Path = ROOT / "README.md") -> str:
    text = path.read_text(encoding="utf-8")
    section = text.split("## Run the tests" if "## Run the tests" in text else "## 运行测试", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, flags=re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == [readme_test_command()]
    assert "pip install" in readme_test_command() and "pytest" in readme_test_command()


def test_version_is_the_same_everywhere() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "(.+)"$', pyproject, flags=re.M).group(1) == gi.VERSION


def test_script_header_declares_no_dependencies() -> None:
    source = (ROOT / "scripts" / "generate_image.py").read_text(encoding="utf-8")
    header = source.split('"""', 1)[0]
    assert header.startswith("#!/usr/bin/env python3\n# /// script\n")
    assert '# requires-python = ">=3.9"\n# dependencies = []\n# ///' in header
    assert source.rstrip().endswith('if __name__ == "__main__":\n    raise SystemExit(main())')


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names needs Python 3.10")
def test_script_imports_only_the_standard_library() -> None:
    tree = ast.parse((ROOT / "scripts" / "generate_image.py").read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert modules - set(sys.stdlib_module_names) == set()


def test_skill_front_matter() -> None:
    text = (ROOT / "SKILL.md").read_text(encoding="utf-8")
    front = text.split("---\n")[1]
    assert re.search(r"^name: apiyi-gpt-image-2-gen$", front, flags=re.M)
    description = re.search(r"^description: (.+)$", front, flags=re.M).group(1)
    assert "gpt-image-2" in description and "APIYI" in description and "edit" in description


def test_console_entry_point_is_main() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    target = re.search(r'^apiyi-gpt-image-2-gen = "(.+)"$', pyproject, flags=re.M).group(1)
    module, function = target.split(":")
    assert (module, getattr(gi, function)) == ("generate_image", gi.main)


def installed_command() -> Path:
    """The console script pip made for this environment (the README's test command installs it)."""
    folder = Path(sys.executable).parent
    found = [folder / name for name in ("apiyi-gpt-image-2-gen", "apiyi-gpt-image-2-gen.exe") if (folder / name).exists()]
    if not found:
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    return found[0]


def test_the_installed_command_speaks_its_own_name(tmp_path: Path) -> None:
    import subprocess

    command = str(installed_command())
    usage = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert usage.startswith("usage: apiyi-gpt-image-2-gen ") and "generate_image.py" not in usage
    refused = subprocess.run([command, "-p", "cat", "-s", "0x0"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == (2, "apiyi-gpt-image-2-gen: error: --size 0x0: width and "
                                                       "height must be above 0; e.g. 1024x1024\n")


def test_a_reference_is_a_file_when_there_is_one_else_its_url(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    assert gi.reference("batch-template.md") == str(ROOT / "references" / "batch-template.md")
    monkeypatch.setattr(gi, "__file__", str(tmp_path / "site-packages" / "generate_image.py"))
    url = "https://github.com/apiyi/apiyi-gpt-image-2-gen/blob/main/references/batch-template.md"
    assert gi.reference("batch-template.md") == url
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^Repository = "(.+)"$', pyproject, flags=re.M).group(1) == gi.REPOSITORY_URL


def test_size_guide_table_is_the_scripts_own_mapping() -> None:
    import size_table

    text = size_table.GUIDE.read_text(encoding="utf-8")
    assert size_table.with_table(text) == text, "run: python tests/size_table.py"
    assert "| `-s 16:9` | 1088x608 | 2048x1152 | 3840x2160 |" in text


@pytest.mark.skipif(sys.platform == "win32", reason="file modes")
def test_the_script_is_executable() -> None:
    import os
    import subprocess

    assert os.access(ROOT / "scripts" / "generate_image.py", os.X_OK)
    mode = subprocess.run(["git", "ls-files", "-s", "scripts/generate_image.py"], cwd=ROOT, capture_output=True,
                          text=True).stdout.split()[:1]
    assert mode in ([], ["100755"])     # outside a git checkout (an sdist) only the file mode counts


NODE_PREFIXES = ("node scripts/generate_image.js ", "node SKILL_DIR/scripts/generate_image.js ")


def documented_node_commands() -> list[pytest.param]:
    return [pytest.param(line, id=f"{path.name}:{line.split(' ', 2)[2][:40]}") for path in DOCUMENTS
            for line in code_block_lines(path) if line.startswith(NODE_PREFIXES)]


def test_documents_show_the_node_twin() -> None:
    assert len(documented_node_commands()) >= 3     # README, README.zh-CN and SKILL.md each show one


@pytest.mark.parametrize("line", documented_node_commands())
def test_documented_node_command_works_against_a_local_server(api, isolated: Path, line: str) -> None:
    from twins import run_twin, script_env, skip_reason

    if skip_reason("node"):
        pytest.skip(skip_reason("node"))
    words = shlex.split(line, comments=True)[2:]
    env = script_env(APIYI_API_KEY="sk-test-NOT-A-REAL-KEY-0123456789abcdef", APIYI_BASE_URL=api.url,
                     APIYI_WORKER="inprocess")
    done = run_twin("node", *words, env=env, cwd=isolated)
    assert done.returncode == 0, done.stderr.decode()
    assert [(isolated / p).is_file() for p in done.stdout.decode().splitlines()] == [True]


def test_every_readme_flag_works_in_the_node_twin_or_is_marked_python_only() -> None:
    """The README's flag table is the promise: a row marked *Python only* is a flag the twin refuses
    (test_twins checks the refusal), every other row is a flag it takes."""
    import subprocess

    from twins import SCRIPT_JS, skip_reason

    if skip_reason("node"):
        pytest.skip(skip_reason("node"))
    program = (f"const m = require({json.dumps(str(SCRIPT_JS))}); process.stdout.write(JSON.stringify("
               "{taken: m.OPTIONS.map((o) => o.long), refused: Object.values(m.PYTHON_ONLY)}))")
    twin = json.loads(subprocess.run(["node", "-e", program], capture_output=True, check=True, timeout=30).stdout)
    refused = {flag for entry in twin["refused"] for flag in entry.split("/") if flag.startswith("--")}
    rows = re.findall(r"^\| (?:`-[a-zA-Z]`, )?`(--[a-z-]+)[^|]* \| (\*Python only\.\* )?",
                      (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) == len(flag_table(ROOT / "README.md"))
    marked = {flag for flag, mark in rows if mark}
    assert marked == refused
    assert {flag for flag, mark in rows if not mark} - {"--help", "--version"} <= set(twin["taken"]) - refused
