"""UI-format workflow -> API-format prompt, the way ComfyUI's frontend does it on "Queue".

Doing this against the server's own /object_info (rather than keeping hand-made API twins) also checks that the
shipped workflows still match the node definitions: a renamed or reordered widget breaks the conversion.
"""
from __future__ import annotations

import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NOTE_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes, never sent to the server


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def _is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _extra_values(name: str, spec) -> int:
    """Widgets the frontend adds after an input, whose values it also stores in widgets_values: the seed's
    'control after generate' combo, and the upload button of image inputs."""
    opts = spec[1] if len(spec) > 1 else {}
    control = spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))
    return int(bool(control)) + int(bool(opts.get("image_upload")))


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info.get(node["type"])
        if not info:
            raise KeyError(f"node type {node['type']} is not known to this ComfyUI")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                row = links[inp["link"]]
                linked[inp["name"]] = [str(row[1]), row[2]]
        values = list(node.get("widgets_values", []))
        inputs = {}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in specs.items():
            if _is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                del values[:_extra_values(name, spec)]
            if name in linked:
                inputs[name] = linked[name]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget value(s) left over: {values}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """Overrides widget values of every node of one type (e.g. small sizes for CPU tests)."""
    hits = [n for n in prompt.values() if n["class_type"] == class_type]
    assert hits, f"no {class_type} in the prompt"
    for node in hits:
        for k, v in values.items():
            assert k in node["inputs"], f"{class_type} has no input {k!r}"
            node["inputs"][k] = v
    return prompt
