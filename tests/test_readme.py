"""Every ```python block of README.md runs as written.

The blocks are executed in the order they appear, in one shared namespace (later snippets use
the model and variables the first one builds, as a reader pasting them into one session would).
Nothing is hard-coded about their text: a new or changed snippet is tested as it stands.
"""

import pathlib
import re
import traceback

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

# A fence opening with ```python (optionally more info after it) up to the next closing ```.
_PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(1-based line of the opening fence, source) of every ```python block of `text`."""
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _PYTHON_BLOCK.finditer(text)
    ]


def test_python_blocks_are_found():
    blocks = python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n")
    assert blocks == [(2, "x = 1\n"), (8, "y = x\n")]


def test_readme_has_python_snippets():
    assert python_blocks(README.read_text(encoding="utf-8"))


def test_readme_snippets_run():
    namespace = {"__name__": "__readme__"}
    for line, source in python_blocks(README.read_text(encoding="utf-8")):
        # Leading newlines: tracebacks give the line numbers of README.md itself.
        code = compile("\n" * line + source, "README.md", "exec")
        try:
            exec(code, namespace)  # pylint: disable=exec-used
        except Exception:  # pylint: disable=broad-except
            pytest.fail(
                f"README.md snippet at line {line} raised:\n{traceback.format_exc()}\n{source}"
            )
