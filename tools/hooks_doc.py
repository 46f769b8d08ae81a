"""Render ``docs/hooks.md``, the reference of the hooks, from the spec functions in ``hookspecs.py``.

A repository tool, not part of the package (it writes into the source checkout's ``docs/``):
``python tools/hooks_doc.py`` rewrites the file, ``--check`` exits 1 when it is stale (``make docs`` runs the
first). ``tests/test_hooks_doc.py`` runs the check, so the reference cannot drift from the specs.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from automodel_plugins.registry import hookspecs
from automodel_plugins.registry.markers import PROJECT_NAME

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
_SPEC_ATTR = f"{PROJECT_NAME}_spec"
_ROLE = re.compile(r":[a-z]+:`~?([\w.]+)`")
_TILDE_ROLE = re.compile(r":[a-z]+:`~[\w.]*?\.(\w+)`")
_DOUBLE_TICKS = re.compile(r"``([^`]+)``")
_COMMAND = "python tools/hooks_doc.py"


def spec_functions(module: ModuleType = hookspecs) -> list[Callable[..., Any]]:
    """The hook specs of ``module`` (functions carrying the project's ``hookspec`` marker), in source order."""
    specs = [f for f in vars(module).values() if inspect.isfunction(f) and hasattr(f, _SPEC_ATTR)]
    return sorted(specs, key=lambda f: f.__code__.co_firstlineno)


def signature_line(spec: Callable[..., Any]) -> str:
    """``def name(arg: Annotation, ...) -> Return`` as written in the spec (annotations are strings there)."""
    signature = inspect.signature(spec)
    params = ", ".join(
        name if p.annotation is inspect.Parameter.empty else f"{name}: {_annotation(p.annotation)}"
        for name, p in signature.parameters.items()
    )
    returns = signature.return_annotation
    tail = "" if returns is inspect.Signature.empty else f" -> {_annotation(returns)}"
    return f"def {spec.__name__}({params}){tail}"


def render(module: ModuleType = hookspecs) -> str:
    """The whole Markdown reference: the module's overview, then one section per hook."""
    source = f"{module.__name__.replace('.', '/')}.py"
    lines = [
        "# Hook reference",
        "",
        f"<!-- Generated from {source} by `{_COMMAND}`; do not edit by hand. -->",
        "",
        *markdown(inspect.getdoc(module) or ""),
        "",
        "| hook | returns | what it is for |",
        "| --- | --- | --- |",
        *(_summary_row(spec) for spec in spec_functions(module)),
    ]
    for spec in spec_functions(module):
        lines += ["", *_section(spec)]
    return "\n".join(lines) + "\n"


def markdown(docstring: str) -> list[str]:
    """A reST-flavoured docstring as Markdown: roles and double backticks to code spans, ``::`` blocks fenced."""
    out: list[str] = []
    prose: list[str] = []
    lines = docstring.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.rstrip().endswith("::"):
            prose.append(line)
            continue
        prose.append(line.rstrip()[:-1])
        block, index = _indented_block(lines, index)
        out += [*_inline("\n".join(prose)).splitlines(), "", "```text", *block, "```", ""]
        prose = []
    return out + _inline("\n".join(prose)).splitlines()


# --- helpers ----------------------------------------------------------------------------------------------


def _annotation(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _inline(text: str) -> str:
    text = _TILDE_ROLE.sub(r"``\1``", text)
    text = _ROLE.sub(r"``\1``", text)
    return _DOUBLE_TICKS.sub(r"`\1`", text)


def _indented_block(lines: list[str], index: int) -> tuple[list[str], int]:
    """The indented literal block starting at ``index`` (after blank lines), dedented, and the next index."""
    while index < len(lines) and not lines[index].strip():
        index += 1
    start = index
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith((" ", "\t"))):
        index += 1
    block = textwrap.dedent("\n".join(lines[start:index])).strip("\n").splitlines()
    return block, index


def _first_sentence(spec: Callable[..., Any]) -> str:
    return _inline((inspect.getdoc(spec) or "").split("\n\n")[0].replace("\n", " "))


def _summary_row(spec: Callable[..., Any]) -> str:
    returns = _annotation(inspect.signature(spec).return_annotation).replace("|", "\\|")
    return f"| [`{spec.__name__}`](#{spec.__name__}) | `{returns}` | {_first_sentence(spec)} |"


def _section(spec: Callable[..., Any]) -> Iterator[str]:
    yield f"## {spec.__name__}"
    yield ""
    yield "```python"
    yield "@hookimpl"
    yield f"{signature_line(spec)}: ..."
    yield "```"
    options = {k: v for k, v in getattr(spec, _SPEC_ATTR).items() if v}
    if options:
        yield ""
        yield "Spec options: " + ", ".join(f"`{k}={v!r}`" for k, v in sorted(options.items())) + "."
    yield ""
    yield from markdown(inspect.getdoc(spec) or "")


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/hooks.md`` (or ``PATH``); with ``--check``, exit 1 if it differs from the specs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DOC_PATH)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if not args.check:
        args.path.write_text(text)
        return 0
    current = args.path.read_text() if args.path.is_file() else ""
    if current != text:
        print(f"{args.path} is out of date; run `{_COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
