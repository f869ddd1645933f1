"""Sweep files: what `zlt run`, the sweep registry and the comparison config read, checked field by field.

A sweep file is YAML or JSON holding one sweep entry (SWEEP_FIELDS): the protocol (a name, or a base name plus
overrides, core/protocol.py), the base model, the source persona, the seed, an optional name and cells. Every
value is checked here before anything is built, and a problem is one ProtocolError naming the field. YAML is read
with `yaml_loader` (1e-5 is a float, a key given twice is an error); JSON refuses duplicate keys too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from .protocol import PROTOCOLS, Protocol, ProtocolError, Sweep, get_protocol, is_finite_number, protocol_from_dict

SWEEP_FIELDS = ("protocol", "base_model", "source_persona", "seed", "name", "cells")
# A sweep file must say what it runs and on what: a file holding only `seed: 7` used to start the 25-cell SmolLM2
# demo. The other fields are optional, with the defaults README's sweep-file block lists (Sweep's own defaults:
# source_persona villain, seed 42; name derived; cells = the whole grid).
REQUIRED_SWEEP_FIELDS = {
    "protocol": f"a protocol name {sorted(PROTOCOLS)} or {{base: <name>, <field>: <value>, ...}}",
    "base_model": "smollm2-135m, tiny, a .gguf file, a model directory or a hub id (org/name)",
}
_NOT_A_PATH = ("tiny", "smollm2-135m")  # names core/models.py resolves itself


def sweep_from_dict(d: Mapping[str, Any], *, check_model_path: bool = True) -> Sweep:
    """A sweep entry: {protocol: <name> | {base: <name>, ...overrides} | full dict, base_model, source_persona,
    seed, name, cells: [[lr, epochs], ...]}; protocol and base_model are required (REQUIRED_SWEEP_FIELDS), the
    rest default to Sweep's defaults. Every value is checked here (types included) before anything is built; a
    local base_model path (absolute, ./relative or *.gguf) must exist (``check_model_path``).

    Raises ProtocolError with ``field`` naming the offending field: unknown or missing fields, an empty or malformed
    `cells` (`cells: []` and `cells:` are errors: leave the field out for the whole grid), a cell whose LR is not a
    positive finite number of the grid or whose epochs are not an integer >= 1 of the grid (1.7 is refused, never
    truncated), duplicate cells, a missing model file or directory."""
    if not isinstance(d, Mapping):
        raise ProtocolError(f"expected a mapping of sweep fields {list(SWEEP_FIELDS)}, got {type(d).__name__}",
                            field="(top level)")
    unknown = sorted(set(d) - set(SWEEP_FIELDS), key=str)
    if unknown:
        raise ProtocolError(f"unknown field{'s' if len(unknown) > 1 else ''}; known: {list(SWEEP_FIELDS)}",
                            field=", ".join(map(str, unknown)))
    missing = [k for k in REQUIRED_SWEEP_FIELDS if k not in d]
    if "protocol" in missing:
        raise ProtocolError(f"missing; expected {REQUIRED_SWEEP_FIELDS['protocol']}", field="protocol")
    proto = d["protocol"]
    if isinstance(proto, str):
        protocol = get_protocol(proto)
    elif isinstance(proto, Mapping):
        protocol = protocol_from_dict(proto)
    else:
        raise ProtocolError(f"expected a protocol name {sorted(PROTOCOLS)} or a mapping, got {proto!r}",
                            field="protocol")
    if "base_model" in missing:
        raise ProtocolError(f"missing; expected {REQUIRED_SWEEP_FIELDS['base_model']}", field="base_model")
    for key, want in (("base_model", "a model name or path"), ("source_persona", "a persona name"),
                      ("name", "a sweep name")):
        if key in d and (not isinstance(d[key], str) or not d[key]):
            raise ProtocolError(f"expected {want} (a non-empty string), got {d[key]!r}", field=key)
    cells = _cells(d["cells"], protocol) if "cells" in d else ()
    kwargs = {k: d[k] for k in ("base_model", "source_persona", "seed", "name") if k in d}
    sweep = Sweep(protocol=protocol, cells_subset=cells, **kwargs).validate()
    if check_model_path:
        _check_model_path(sweep.base_model)
    return sweep


def _cells(value: Any, protocol: Protocol) -> tuple[tuple[float, int], ...]:
    whole_grid = "leave the field out to run the whole grid"
    if value is None:
        raise ProtocolError(f"is empty; list [lr, epochs] pairs, or {whole_grid}", field="cells")
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"expected a list of [lr, epochs] pairs, got {value!r}", field="cells")
    if not value:
        raise ProtocolError(f"is an empty list; list [lr, epochs] pairs, or {whole_grid}", field="cells")
    out: list[tuple[float, int]] = []
    for i, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ProtocolError(f"expected a [lr, epochs] pair, got {item!r}", field=f"cells[{i}]")
        lr, ep = item
        if not is_finite_number(lr) or lr <= 0:
            raise ProtocolError(f"learning rate {lr!r} is invalid; expected a finite number > 0",
                                field=f"cells[{i}][0]")
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ProtocolError(f"epochs {ep!r} is invalid; expected an integer >= 1", field=f"cells[{i}][1]")
        if float(lr) not in protocol.learning_rates:
            raise ProtocolError(f"learning rate {lr!r} is not in the grid of protocol {protocol.name!r}: "
                                f"{list(protocol.learning_rates)}", field=f"cells[{i}][0]")
        if ep not in protocol.epochs:
            raise ProtocolError(f"epochs {ep} is not in the grid of protocol {protocol.name!r}: "
                                f"{list(protocol.epochs)}", field=f"cells[{i}][1]")
        if (float(lr), ep) in out:
            raise ProtocolError(f"duplicate of cells[{out.index((float(lr), ep))}] ({lr}, {ep})", field=f"cells[{i}]")
        out.append((float(lr), ep))
    return tuple(out)


# every GGUF file starts with these 4 bytes (the GGUF spec, ggml/docs/gguf.md: "GGUF" in ASCII)
GGUF_MAGIC = b"GGUF"


def _check_model_path(base_model: str) -> None:
    """A local model (what core/models.py would load from disk) must exist now, not fail a run later."""
    path = Path(base_model)
    local = base_model.endswith(".gguf") or base_model.startswith(("/", "./", "~")) or path.exists()
    if base_model in _NOT_A_PATH or not local:
        return  # a name resolved by core/models.py, or a hub id
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise ProtocolError(f"GGUF file {base_model} does not exist", field="base_model")
        with path.open("rb") as f:  # an empty or truncated download used to fail inside the first model step
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ProtocolError(f"{base_model} is not a GGUF file (its first bytes are {magic!r}, not {GGUF_MAGIC!r})",
                                field="base_model")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ProtocolError(f"model directory {base_model} has no config.json", field="base_model")
    elif path.exists():
        raise ProtocolError(f"{base_model} is neither a GGUF file nor a model directory", field="base_model")
    else:
        raise ProtocolError(f"model path {base_model} does not exist", field="base_model")


def load_sweep_file(path: str | Path) -> Sweep:
    """A sweep from a YAML/JSON file; raises ProtocolError naming the field (``(file)`` when the file itself is
    missing or unreadable)."""
    return sweep_from_dict(read_mapping(path))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML (.yaml/.yml) or JSON file; ProtocolError (field ``(file)`` or
    ``(top level)``) with a one-line message when it is missing, unparsable or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"config file {path} does not exist", field="(file)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ProtocolError(f"cannot read {path}: {e}", field="(file)") from e
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=yaml_loader())
        except yaml.YAMLError as e:
            raise ProtocolError(f"not valid YAML: {yaml_error_line(e)}", field="(file)") from e
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise ProtocolError(f"not valid JSON: {e}", field="(file)") from e
    if not isinstance(data, dict):
        raise ProtocolError(f"must hold a mapping of sweep fields, got {type(data).__name__}", field="(top level)")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object hook: a key given twice is an error, as in the YAML loader (JSON keeps the last one)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ProtocolError(f"not valid JSON: duplicate key {key!r}", field="(file)")
        seen[key] = value
    return seen


def yaml_error_line(e) -> str:
    """A PyYAML error as one line: the problem and where (`... at line 4, column 1`)."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem}{at}"


def yaml_loader():
    """yaml.SafeLoader that also reads 1e-5 / 5E-6 / 1.0e5 as floats, and refuses a key given twice in one mapping.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so `learning_rates: [1e-6, 5e-6]`
    would otherwise load as strings. And it keeps the last of duplicate keys silently (`seed: 1` ... `seed: 2` ran
    seed 2), which the YAML spec forbids: a ConstructorError naming the key and both lines instead."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        earlier = first.get(key)
                    except TypeError:  # an unhashable key: the base class raises its own error for it
                        continue
                    if earlier is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {earlier.line + 1})",
                            key_node.start_mark)
                    first[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader
