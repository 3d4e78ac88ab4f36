"""The README and docs/ run as written, so no page can drift from the code.

- Every ```python block runs: each page's blocks in order in one namespace (later blocks reuse
  earlier names), in a temporary working directory. A block that cannot run on a CPU is tagged
  ```python no-run and must be listed in NO_RUN, so nothing is skipped silently.
- Every ```bash run block runs as shell commands (`python` is this interpreter): the smoke train
  and the AOT fit check, each command once however many pages show it, all at the same time.
  A path /tmp/X in any example is one temporary folder, so the Python example that calls
  train.run on the smoke run's workdir shares that run instead of training again.
- The tags are the ones the mkdocs hook accepts (docs/fence_tags.py), relative links in the
  README reach a file and a heading, the quick start is what .ci/run installs and runs, and
  every object of the API reference documents its arguments.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import tokenize
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
# (page, first line of the block) of every ```python no-run block; keep this empty if you can.
NO_RUN: set[tuple[str, str]] = set()

_spec = importlib.util.spec_from_file_location("fence_tags", DOCS / "fence_tags.py")
fence_tags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fence_tags)
OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)(?P<rest>[^`\n]*)$")
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)


@dataclasses.dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    tag: str  # "", "no-run" or "run"
    code: str  # snippet includes (--8<-- "path") expanded, as mkdocs renders them


def blocks(path: pathlib.Path) -> list[Block]:
    """The fenced code blocks of one page (indented ones inside list items too)."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    rel = str(path.relative_to(ROOT))
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = len(m["indent"]), i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        assert i < len(lines), f"{rel}:{start + 1}: code block is never closed"
        code = SNIPPET.sub(
            lambda s: (ROOT / s["path"]).read_text(encoding="utf-8"), "\n".join(body)
        )
        out.append(Block(rel, start + 1, m["lang"], m["rest"].strip(), code + "\n"))
        i += 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL_RUN = [b for b in ALL if b.lang == "bash" and b.tag == "run"]


def test_fence_tags_are_known_and_no_run_is_counted():
    bad = [
        f"{b.page}:{b.line} ```{b.lang} {b.tag}"
        for b in ALL
        if b.tag and b.tag not in fence_tags.TAGS.get(b.lang, ())
    ]
    assert not bad, f"unknown fence tags (allowed: {fence_tags.TAGS}): {bad}"
    no_run = {(b.page, b.code.splitlines()[0]) for b in PYTHON if b.tag == "no-run"}
    assert no_run == NO_RUN, f"```python no-run blocks differ from NO_RUN: {no_run ^ NO_RUN}"
    # The pages that carry the examples still do (a deleted example fails here, not silently).
    pages = {b.page for b in PYTHON if not b.tag}
    for page in ("README.md", "docs/layer.md", "docs/scaling.md", "docs/training.md"):
        assert page in pages, f"{page} has no runnable ```python block"


def test_the_hook_strips_tags_and_refuses_unknown_ones():
    class Page:  # what mkdocs passes: only page.file.src_path is read
        class file:
            src_path = "x.md"

    md = "```python no-run\nx = 1\n```\n```bash run\nls\n```\n```python\ny = 2\n```\n"
    assert fence_tags.on_page_markdown(md, Page) == md.replace(" no-run", "").replace(" run", "")
    with pytest.raises(ValueError, match="unknown fence tag 'norun'"):
        fence_tags.on_page_markdown("```python norun\n```\n", Page)


def _pages_with_python():
    return sorted({b.page for b in PYTHON if not b.tag})


TMP = re.compile(r"/tmp/([\w.-]+)")


def _local(text: str, root: pathlib.Path) -> str:
    """/tmp/X in an example -> root/X: one folder per name, shared by every example, so the
    Python example that reuses the smoke run's workdir finds it."""
    return TMP.sub(lambda m: str(root / m[1]), text)


def _commands(code: str) -> list[str]:
    """One string per command: backslash continuations joined, blank lines dropped."""
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.fixture(scope="module")
def examples_tmp(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="module")
def shell_runs(examples_tmp):
    """Runs every ```bash run command once, all at the same time; [(command, status, output)]."""
    commands = list(dict.fromkeys(c for b in SHELL_RUN for c in _commands(b.code)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user has
    env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    procs = []
    for command in commands:
        argv = shlex.split(_local(command, examples_tmp), comments=True)
        assert argv[0] == "python", f"a ```bash run command starts with python: {command}"
        if "moe_jax.aot" in argv and importlib.util.find_spec("libtpu") is None:
            if os.environ.get("CI"):
                pytest.fail("the AOT fit check needs the aot extra: pip install -e '.[aot]'")
            continue  # locally without the aot extra: the other commands still run
        argv[0] = sys.executable
        log = examples_tmp / f"command{len(procs)}.log"  # a file: no pipe to fill up
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        procs.append((command, proc, log))
    return [(c, p.wait(timeout=600), log.read_text()) for c, p, log in procs]


def test_shell_examples_run(shell_runs, examples_tmp):
    commands = [c for c, _, _ in shell_runs]
    assert any("train.py" in c and ":smoke" in c and "--workdir=/tmp/" in c for c in commands), (
        f"the smoke train must stay a ```bash run block (with --workdir=/tmp/...): {commands}"
    )
    if importlib.util.find_spec("libtpu") is not None:
        assert any("moe_jax.aot" in c for c in commands), "the AOT fit check must stay a block"
    for command, status, out in shell_runs:
        assert status == 0, f"{command}\n{out[-3000:]}"
        if "train.py" in command:  # what docs/training.md says a run prints and leaves
            assert re.search(r"done at step \d+", out), out[-2000:]
            assert "eval null ratio (target 0.50)" in out, out[-2000:]
            workdir = pathlib.Path(_local(re.search(r"--workdir=(\S+)", command)[1], examples_tmp))
            for name in (
                "metrics.jsonl",
                "config.json",
                "loss.png",
                "null_ratio.png",
                "routing_heatmap.png",
                "checkpoints",
                "tb",
            ):
                assert (workdir / name).exists(), f"{command}: no {name} in the workdir"
        if "moe_jax.aot" in command:
            assert re.search(r"total .* of .*: fits", out), out[-2000:]


@pytest.mark.parametrize("page", _pages_with_python())
def test_python_examples_run(page, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": f"docs:{page}"}
    code = [b for b in PYTHON if b.page == page and not b.tag]
    if any(TMP.search(b.code) for b in code):
        request.getfixturevalue("shell_runs")  # the folders the shell examples wrote
    root = request.getfixturevalue("examples_tmp")
    for b in code:
        # Pad with newlines so a traceback names the line of the page.
        exec(compile("\n" * b.line + _local(b.code, root), str(ROOT / page), "exec"), namespace)
    if page == "README.md":  # the layer example
        assert namespace["y"].shape == namespace["x"].shape
        assert 0.0 <= float(namespace["aux"]["null_ratio"]) <= 1.0
    if page == "docs/scaling.md":  # the expert-parallel example built and ran its layer
        assert namespace["layer"].parallel is not None
        assert namespace["y"].shape == namespace["x"].shape
    if page == "docs/training.md":  # train.run from Python found the smoke run finished
        assert namespace["result"].get("already_done"), namespace["result"]


def _slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = unicodedata.normalize("NFKD", re.sub(r"`", "", heading))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode()).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m[1]) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_links_reach_a_file_and_heading():
    """mkdocs --strict checks the links between docs/ pages; the README is not one of them."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    local = [u for u in links if not re.match(r"[a-z]+:", u)]
    assert any(u.startswith("docs/") for u in local)
    for url in local:
        path, _, anchor = url.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in _anchors(target), f"README links to {url}: no such heading"


def test_the_slug_matches_mkdocs():
    assert _slug("Training across hosts: FSDP + expert parallel (`mesh.*`, `dist.*`)") == (
        "training-across-hosts-fsdp-expert-parallel-mesh-dist"
    )
    assert _slug("Ahead-of-time fit check") == "ahead-of-time-fit-check"


def test_quick_start_is_what_ci_runs():
    """The README's two quick-start commands; .ci/run installs and runs the second (the
    newest environment also builds these docs in strict mode)."""
    quick = next(b for b in blocks(README) if b.lang == "bash")
    assert _commands(quick.code) == [
        "pip install -e . && python train.py          # main job: trains the default null-expert VLM on CPU",
        'pip install -e ".[test,aot]" && pytest       # the test suite (what CI runs, plus ruff)',
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # install_env's line: exactly the README's extras, then pytest.
    extras = re.search(r'pip install -q -e "\.\[([\w,-]+)\]" "\$@"', ci)
    assert extras and extras[1] == "test,aot", extras
    assert "&& pytest)" in ci
    assert re.search(r'pip install -q -e "\.\[docs\]"', ci) and "mkdocs build --strict" in ci
    assert (ROOT / "mkdocs.yml").exists()


# ------------------------------------------------------------------------ the API reference
def _api_objects() -> list[str]:
    names = []
    for page in sorted((DOCS / "api").glob("*.md")):
        names += re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return names


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    try:
        return importlib.import_module(name)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


def _documented(doc: str, section: str) -> set[str]:
    """Names listed in a Google-style section ("Args", "Attributes") of a docstring."""
    m = re.search(rf"^{section}:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    if not m:
        return set()
    indent = min(len(x) - len(x.lstrip()) for x in m[1].splitlines() if x.strip())
    pattern = rf"^ {{{indent}}}(\*{{0,2}}\w+)(?: \(.*?\))?:"
    return {x.lstrip("*") for x in re.findall(pattern, m[1], flags=re.M)}


def _commented_fields(cls) -> set[str]:
    """Dataclass / NamedTuple fields whose statement carries a trailing comment (the house
    style; docs/griffe_comments.py shows them in the reference)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {
        t.start[0]
        for t in tokenize.generate_tokens(io.StringIO(src).readline)
        if t.type == tokenize.COMMENT
    }
    fields = [n for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)]
    return {n.target.id for n in fields if comments & set(range(n.lineno, n.end_lineno + 1))}


def _params(obj) -> list[str]:
    fn = obj.__init__ if inspect.isclass(obj) else obj
    fn = getattr(fn, "__wrapped__", fn)  # jax.jit
    if inspect.isclass(obj) and fn is object.__init__:
        return []
    names = list(inspect.signature(fn).parameters)
    return [n for n in names if n != "self"]


def test_api_reference_documents_every_argument():
    """Each object on the API pages has a docstring; functions and classes list every argument
    under Args (dataclass fields may instead carry a trailing comment)."""
    names = _api_objects()
    for required in (
        "moe_jax.MoE",
        "moe_jax.MoEConfig",
        "moe_jax.calibrate_null",
        "moe_jax.hf.load_model",
        "moe_jax.parallel.make_mesh",
        "kernels_pallas.gmm",
        "kernels_pallas.tgmm",
        "moe_jax.train.run",
        "moe_jax.train.Loop",
        "moe_jax.train.TrainConfig",
        "moe_jax.train.from_config_dict",
    ):
        assert required in names, f"{required} is missing from docs/api/"
    missing = {}
    for name in names:
        obj = _resolve(name)
        if inspect.ismodule(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        assert doc.strip(), f"{name} has no docstring"
        if inspect.isclass(obj) and (issubclass(obj, Exception) or getattr(obj, "_is_protocol", 0)):
            continue  # an error's docstring says when it is raised; a Protocol has no arguments
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields")):
            fields = (
                [f.name for f in dataclasses.fields(obj)]
                if dataclasses.is_dataclass(obj)
                else list(obj._fields)
            )
            have = _documented(doc, "Args") | _documented(doc, "Attributes")
            have |= _commented_fields(obj)
        else:
            fields = _params(obj)
            init_doc = inspect.getdoc(obj.__init__) if inspect.isclass(obj) else ""
            have = _documented(doc, "Args") | _documented(init_doc or "", "Args")
        if lost := [f for f in fields if f not in have]:
            missing[name] = lost
    assert not missing, f"arguments without a description: {missing}"
    call_doc = inspect.getdoc(_resolve("moe_jax.MoE").__call__) or ""
    assert {"x", "modality", "deterministic"} <= _documented(call_doc, "Args")
    assert "Raises:" in call_doc and "Returns:" in call_doc


def test_the_api_checks_can_fail():
    doc = "One line.\n\nArgs:\n    a: first.\n    b (int): second,\n        more.\n"
    assert _documented(doc, "Args") == {"a", "b"}
    assert _documented("No sections.", "Args") == set()

    def f(a, b, *, c=1):
        """Only a is described.

        Args:
            a: this one.
        """

    assert [p for p in _params(f) if p not in _documented(inspect.getdoc(f), "Args")] == ["b", "c"]

    # fmt: off
    @dataclasses.dataclass
    class C:
        a: int = 1  # described
        b: int | None = (
            None  # described on its second line (as ruff format wraps a long one)
        )
        c: int = 0
    # fmt: on

    assert _commented_fields(C) == {"a", "b"}
