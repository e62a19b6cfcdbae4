"""mita: Mixture-of-Top-k Attention (MiTA) and an attention zoo on timm ViT/DeiT."""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"

# A source checkout used without `pip install` has kernels/ beside mita/ instead of inside it:
# map it to `mita.kernels` so both layouts import the same way.
if _ilu.find_spec("mita.kernels") is None:  # pragma: no cover - depends on the install layout
    _kdir = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels")
    if _os.path.isfile(_os.path.join(_kdir, "__init__.py")):
        _spec = _ilu.spec_from_file_location(
            "mita.kernels", _os.path.join(_kdir, "__init__.py"), submodule_search_locations=[_kdir]
        )
        _mod = _ilu.module_from_spec(_spec)
        _sys.modules["mita.kernels"] = _mod
        _spec.loader.exec_module(_mod)
        kernels = _mod
