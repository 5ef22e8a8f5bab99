"""User-given names that become file or folder names (a LoRA's `output_name`, a validation
case's name): checked before any work starts, with an error naming the input.

A name is 1 to `MAX_NAME_LENGTH` characters: letters, digits, ``-``, ``_``, ``.`` and
spaces; not starting with ``.``, ``~`` or a space, not ending with ``.`` or a space (Windows
drops those), and not a Windows device name (CON, NUL, COM1, ...). The limit leaves room
within the usual 255-byte file name limit for what is added to it: ``_partial_step<N>``,
``_diffusers``, a ``_<n>`` counter, ``.safetensors`` and a temporary-file prefix.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 120
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])$", re.IGNORECASE)
RULE = (f"use 1 to {MAX_NAME_LENGTH} letters, digits, '-', '_', '.' and spaces, not starting with '.', '~' or a "
        "space and not ending with '.' or a space")


def name_problem(value: object) -> str | None:
    """Why `value` cannot be a file name (None: it can)."""
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is {len(value)} characters long"
    bad = sorted({c for c in value if not (c.isalnum() or c in "-_. ")})
    if bad:
        return "it contains " + " ".join(repr(c) for c in bad)
    if value[0] in ".~ " or value[-1] in ". ":
        return "it starts or ends with a character that is not allowed there"
    if _RESERVED.match(value.split(".")[0].strip()):
        return "it is a reserved device name on Windows"
    return None


def validate_name(value: object, label: str) -> str:
    """`value` when it is a valid name, else `ValueError` naming `label` and the rule."""
    problem = name_problem(value)
    if problem is not None:
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
        raise ValueError(f"{label} {shown!r} cannot be used as a file name: {problem}; {RULE}")
    return value
