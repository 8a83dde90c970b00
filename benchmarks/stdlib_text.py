"""Held-out English prose nobody here wrote: docstrings of the Python standard library.

General-capability retention of a pretrained model is measured as its next-token loss on text
that is (a) real English written by other people, (b) available offline on every machine that
runs Python, and (c) never part of any fine-tuning task. The docstrings of a fixed list of
standard-library modules fit: :func:`stdlib_passages` walks them with :mod:`inspect`, keeps the
prose paragraphs (no doctests, no indented code or option tables), and selects a deterministic
subset.

The selection depends only on the module list, the filters and the text of the docstrings, so it
is identical across runs and machines with the same Python minor version (the docstrings
themselves change a little between Python releases; :func:`passage_set_id` fingerprints the
selection so results record which set they were measured on).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence

# Pure-Python modules importable everywhere without side effects, with long prose docstrings.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib", "inspect",
    "ipaddress", "json", "locale", "logging", "logging.handlers", "mailbox", "mimetypes",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile",
)

_FUNCTION_WORDS = frozenset(
    "the a an of to in is are be for and or that this with as by on it not if from which".split()
)
_CODE_MARKERS = re.compile(r">>>|\.\.\. |::|==|->|\(\)|\[\]|\{\}|__\w+__|\w+\(\w*[,=]|\|")


def _docstrings(module_name: str) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of a module, its classes, functions and methods, in
    sorted name order; only objects defined in the module itself."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a platform may lack a module; the rest still count
        return
    if module.__doc__:
        yield module_name, module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__doc__:
            yield f"{module_name}.{name}", obj.__doc__
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("_") or not inspect.isfunction(meth) or not meth.__doc__:
                    continue
                yield f"{module_name}.{name}.{meth_name}", meth.__doc__


def is_english_prose(paragraph: str) -> bool:
    """Whether a (whitespace-collapsed) paragraph reads as English prose rather than code.

    Rules: no code markers (``>>>``, ``::``, ``==``, calls, dunder names, pipes), at least 85% of
    the characters letters or spaces, at least 8 words, at least 15% of the words from a small
    list of English function words ("the", "of", "is", ...), and ending in sentence punctuation.
    """
    if _CODE_MARKERS.search(paragraph):
        return False
    words = paragraph.split()
    if len(words) < 8 or paragraph[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    if letters < 0.85 * len(paragraph):
        return False
    common = sum(w.lower().strip(",.;:") in _FUNCTION_WORDS for w in words)
    return common >= 0.15 * len(words)


def prose_of(docstring: str) -> str:
    """The English prose of a docstring: its paragraphs that pass :func:`is_english_prose`
    (indented blocks and doctest/code paragraphs dropped), whitespace collapsed, joined by
    one space."""
    text = inspect.cleandoc(docstring)
    keep = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: code, option lists, tables
        flat = " ".join(para.split())
        if is_english_prose(flat):
            keep.append(flat)
    return " ".join(keep)


def stdlib_passages(n: int | None = None, *, min_chars: int = 200,
                    modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """A deterministic set of English passages from standard-library docstrings.

    Every docstring of ``modules`` is reduced to its prose (:func:`prose_of`); passages shorter
    than ``min_chars``, passages that fail :func:`is_english_prose` as a whole, and duplicates
    are dropped; the rest are ordered by the SHA-256 of their
    text (a fixed pseudo-random order that does not depend on import order or dict layout) and
    the first ``n`` are returned.

    Args:
        n: how many passages (``None``: all).
        min_chars: minimum passage length in characters.
        modules: importable module names to read.

    Returns:
        Up to ``n`` passages (fewer when the modules hold fewer).

    Raises:
        ValueError: ``n`` < 1 or ``min_chars`` < 1.
    """
    if n is not None and n < 1:
        raise ValueError(f"n={n} must be >= 1 (or None for every passage)")
    if min_chars < 1:
        raise ValueError(f"min_chars={min_chars} must be >= 1")
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when read
        for module_name in modules:
            for _, doc in _docstrings(module_name):
                prose = prose_of(doc)
                if len(prose) >= min_chars and is_english_prose(prose):
                    seen.add(prose)
    ordered = sorted(seen, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return ordered if n is None else ordered[:n]


def passage_set_id(passages: Sequence[str]) -> str:
    """Short fingerprint of a passage list (record it next to results measured on it)."""
    h = hashlib.sha256()
    for p in passages:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]
