"""The one YAML rule for recipes, model files and --set values.

YAML 1.1 (PyYAML) reads `1e-3` and `3e30` as strings; people writing recipes mean numbers, as YAML 1.2 does.
Aliases (`*name`) are refused: no recipe needs them, and nested ones expand a small file into gigabytes (a
"billion laughs" file) before any check could look at its size.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import PipelineError


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor[:40]}): recipes and model files take no anchors or aliases",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys: `seed:` twice in a recipe trained silently with the second.
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key_node.value[:40]!r} twice in one mapping", key_node.start_mark)
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python's limit on the digits of an int read from text (4,300)
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value):,} digits",
                                                    node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse(text: str):
    """YAML text -> Python values (safe: plain types only), with exponent floats read as numbers."""
    return yaml.load(text, Loader=_Loader)


def load(path) -> object:
    """A YAML file; unreadable or malformed files are a PipelineError naming the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None
    try:
        return parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise PipelineError(f"{path}{line}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise PipelineError(f"{path}: not readable YAML (nested too deeply)") from None
