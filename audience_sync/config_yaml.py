"""The YAML reader for config.yaml: PyYAML's safe loader, minus what makes a config lie or hang."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# Anchors and aliases stay allowed (`<<: *defaults` to share a schedule or a destination list
# is ordinary YAML), but what they expand to is bounded. PyYAML itself builds an alias bomb
# cheaply, as shared references; everything after it (env substitution, validation) walks the
# expanded tree, and a 371-byte "billion laughs" reached 2.1 GB. A real config is a few
# thousand nodes; aliases may add this many on top of what the file spells out.
MAX_ALIAS_EXPANSION = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigYamlError(yaml.MarkedYAMLError):
    """A config-specific refusal, reported like a YAML syntax error (with its line)."""


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds alias expansion."""

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Node] = {}
        for key_node, _ in node.value:
            # A merge key (`<<`) may repeat, and keys it brings in may be overridden: only keys
            # spelled out twice in one mapping are mistakes (a second `audiences:` silently
            # replaced the first).
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                first = seen[ident].start_mark.line + 1
                raise ConfigYamlError(
                    problem=f"duplicate key {key_node.value!r} (first on line {first})",
                    problem_mark=key_node.start_mark)
            seen[ident] = key_node
        return node

    def construct_document(self, node: Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: Node) -> None:
    """Count the nodes of the tree as aliases expand it; refuse past the bound or on a cycle.

    Each distinct node is counted once (its expanded size memoised), so this takes time in
    proportion to the file, however large the expansion it finds.
    """
    expanded: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node) -> int:
        ident = id(node)
        if ident in expanded:
            return expanded[ident]
        if ident in visiting:
            raise ConfigYamlError(problem="an alias refers to the node that contains it",
                                  problem_mark=node.start_mark)
        visiting.add(ident)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        visiting.discard(ident)
        expanded[ident] = total
        return total

    extra = size(root) - len(expanded)
    if extra > MAX_ALIAS_EXPANSION:
        raise ConfigYamlError(problem=f"aliases expand the document by more than "
                                      f"{MAX_ALIAS_EXPANSION} nodes")


def load_yaml(text: str) -> Any:
    """One YAML document, read safely; yaml.YAMLError (with a mark where known) when refused."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
