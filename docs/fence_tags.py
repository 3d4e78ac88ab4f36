"""mkdocs hook: fenced-code tags that tests/test_docs.py reads, removed before rendering.

```python no-run   a Python example the test suite does not run (it counts them)
```bash run        shell commands the test suite runs (tests/test_docs.py)
Markdown renders neither tag, so each is stripped from the fence line; any other word after
the language fails the build, so a misspelt tag cannot hide an example from the tests.
"""

from __future__ import annotations

import re

TAGS = {"python": ("no-run",), "bash": ("run",)}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)(?P<rest>[^\n`]*)$", re.M)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    def strip(m: re.Match) -> str:
        words = m["rest"].split()
        if not words:
            return m[0]
        if len(words) > 1 or words[0] not in TAGS.get(m["lang"], ()):
            raise ValueError(
                f"{page.file.src_path}: unknown fence tag {m['rest'].strip()!r} after "
                f"```{m['lang']} (allowed: {TAGS})"
            )
        return f"{m['indent']}{m['fence']}{m['lang']}"

    return FENCE.sub(strip, markdown)
