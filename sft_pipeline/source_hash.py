"""A hash of Python code that leaves out its comments and docstrings: what a stage's key holds of the code it runs
(``flows/stages.py``), so that editing a comment re-runs nothing and editing code re-runs the stage.

The same on Python 3.10 to 3.13, so that a store moved between machines is reused: it hashes tokens (not
``ast.dump``, whose fields change between versions), an f-string as its source text (3.12 splits it into tokens of
its own), indentation as a marker (not its width). Standard library only.
"""
from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # where sft_pipeline/, tasks/ and flows/ are: a checkout or site-packages
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _docstrings(tree: ast.AST) -> set[int]:
    """The first line of every docstring (module, class, function)."""
    rows = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                rows.add(first.lineno)
    return rows


def _text(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    if start[0] == end[0]:
        return lines[start[0] - 1][start[1]:end[1]]
    return lines[start[0] - 1][start[1]:] + "".join(lines[start[0]:end[0] - 1]) + lines[end[0] - 1][:end[1]]


def code_tokens(source: str) -> list[str]:
    """The tokens of ``source`` that are code: no comments, blank lines or docstrings; f-strings whole."""
    docs, lines = _docstrings(ast.parse(source)), source.splitlines(keepends=True)
    out: list[str] = []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    skip_newline = False
    for tok in tokens:
        if tok.type in _SKIP:
            continue
        if tok.type == tokenize.STRING and tok.start[0] in docs and (not out or out[-1] in ("\n", "\t>", "\t<")):
            skip_newline = True  # the docstring and the end of its line
            continue
        if tok.type == tokenize.NEWLINE:
            if not skip_newline:
                out.append("\n")
            skip_newline = False
            continue
        skip_newline = False
        if tok.type == _FSTRING_START:
            depth, start = 1, tok.start
            while depth:
                inner = next(tokens)
                depth += (inner.type == _FSTRING_START) - (inner.type == _FSTRING_END)
            out.append(_text(lines, start, inner.end))
        elif tok.type == tokenize.INDENT:
            out.append("\t>")
        elif tok.type == tokenize.DEDENT:
            out.append("\t<")
        else:
            out.append(tok.string)
    return out


def _named(source: str, names: list[str], where: str) -> list[tuple[str, str]]:
    """The source of each named top-level function or class (decorators included)."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    found = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{where}: no top-level {', '.join(missing)} to hash")
    out = []
    for name in names:
        node = found[name]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        out.append((f"{where}:{name}", "".join(lines[first - 1:node.end_lineno])))
    return out


def sources(spec: str, root: Path = ROOT) -> list[tuple[str, str]]:
    """(name, source) for ``spec``: a file (``tasks/train.py``), a directory (its ``*.py`` files), or a file's
    top-level functions and classes (``sft_pipeline/models.py:load_model,bnb_config``); paths relative to ``root``."""
    path, _, names = spec.partition(":")
    target = Path(root) / path
    if names:
        return _named(target.read_text(encoding="utf-8"), names.split(","), path)
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]


def source_hash(specs, root: Path = ROOT) -> str:
    """The hash of the code in ``specs`` (see ``sources``), 16 hex digits."""
    h = hashlib.sha256()
    for spec in specs:
        for name, source in sources(spec, root):
            h.update(name.encode() + b"\0" + " ".join(code_tokens(source)).encode() + b"\0")
    return h.hexdigest()[:16]
