"""NextStep-1 for ComfyUI: the entry point ComfyUI imports from custom_nodes/.

Only the node mappings live here; the node classes are in nodes/, the model code in nextstep_core/.
Relative imports only: ComfyUI-Manager names the folder after the registry id, and ComfyUI's own
top-level module is also called `nodes`.
"""
try:
    import folder_paths  # noqa: F401  ComfyUI's own module: present in every ComfyUI process
except ImportError:
    # Imported outside ComfyUI: pytest imports a rootdir __init__.py as a package, and nextstep_core users may
    # import the repo as a package. Nothing to register there; inside ComfyUI import errors still surface.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
