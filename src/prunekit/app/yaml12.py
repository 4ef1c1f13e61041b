"""A YAML loader that reads plain scalars the way YAML 1.2 (core schema) does.

PyYAML implements YAML 1.1, whose implicit typing surprises recipe authors:

* ``2:4`` (an N:M pattern) is a base-60 integer, ``124``;
* ``1.0e6`` is a *string* (1.1 floats need a dot and a signed exponent), ``1e-3`` too;
* ``yes`` / ``no`` / ``on`` / ``off`` are booleans, ``010`` is octal 8, ``1_000`` is 1000,
  ``2024-01-01`` is a date.

:class:`Yaml12Loader` resolves untagged plain scalars with the YAML 1.2 core schema
(https://yaml.org/spec/1.2.2/#1032-tag-resolution) instead:

==========  ===============================================================================
null        ``~``, ``null``, ``Null``, ``NULL``, empty
bool        ``true``/``True``/``TRUE``, ``false``/``False``/``FALSE``
int         ``[-+]?[0-9]+`` (decimal, ``010`` is 10), ``0o[0-7]+``, ``0x[0-9a-fA-F]+``
float       ``[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?``, ``.inf``, ``-.inf``, ``.nan``
string      everything else (``2:4``, ``yes``, ``1_000``, ``2024-01-01``)
==========  ===============================================================================

Quoted scalars are always strings; explicit tags (``!!float 1``) still work; ``<<`` merge keys are
kept.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
#: YAML 1.1 implicit tags replaced by the 1.2 ones above (or dropped: timestamps, ``=`` values)
_REPLACED = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
}


class Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema resolution of plain scalars."""

    def construct_yaml12_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)

    def construct_yaml12_float(self, node: yaml.ScalarNode) -> float:
        text = str(self.construct_scalar(node)).lower()
        if text.endswith(".inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        if text == ".nan":
            return float("nan")
        return float(text)

    def construct_yaml12_bool(self, node: yaml.ScalarNode) -> bool:
        return str(self.construct_scalar(node)).lower() == "true"


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
):
    Yaml12Loader.add_implicit_resolver(_tag, _regexp, _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", Yaml12Loader.construct_yaml12_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", Yaml12Loader.construct_yaml12_float)
Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", Yaml12Loader.construct_yaml12_bool)


def load_yaml(text: str) -> Any:
    """Parse ``text`` with :class:`Yaml12Loader` (safe: plain data only, nothing executed)."""
    return yaml.load(text, Loader=Yaml12Loader)  # a SafeLoader subclass: plain data only
