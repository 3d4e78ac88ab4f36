"""griffe extension (mkdocs.yml): the trailing comments of a class's fields become the
"Attributes" section of its docstring in the API reference.

The house style puts the meaning of every dataclass field in a trailing comment
(`d_model: int  # D: model width`); this shows them without writing each field twice. A class
whose docstring already has an Attributes section keeps it.
"""

from __future__ import annotations

import io
import tokenize

import griffe


def _comment(attr: griffe.Attribute) -> str:
    """The trailing comment(s) of an attribute's statement, joined; "" if none."""
    tokens = tokenize.generate_tokens(io.StringIO("\n".join(attr.lines) + "\n").readline)
    return " ".join(t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT)


class TrailingComments(griffe.Extension):
    def on_class_members(self, *, node, cls: griffe.Class, agent, **kwargs) -> None:
        text = cls.docstring.value if cls.docstring else ""
        if "Attributes:" in text:
            return
        rows = []
        for name, member in cls.members.items():
            if name.startswith("_") or not member.is_attribute or member.docstring is not None:
                continue
            if comment := _comment(member):
                kind = f" ({member.annotation})" if member.annotation is not None else ""
                rows.append(f"    {name}{kind}: {comment}")
        if rows:
            cls.docstring = griffe.Docstring(
                f"{text}\n\nAttributes:\n" + "\n".join(rows),
                lineno=cls.docstring.lineno if cls.docstring else cls.lineno,
                parent=cls,
            )
