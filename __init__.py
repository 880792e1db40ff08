"""NextStep-1 for ComfyUI: the entry point ComfyUI imports from custom_nodes/.

Only the node mappings live here; the node classes are in nodes/, the model code in nextstep_core/.
Relative imports only: ComfyUI-Manager names the folder after the registry id, and ComfyUI's own
top-level module is also called `nodes`.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
