"""The hot-path primitives of ``blockengine._native`` (its pure-Python twins if the
compiled backend cannot be loaded in this checkout)."""
try:
    from .... import _native as N
except Exception:          # pragma: no cover - broken native build: use the twins
    from .... import _pynative as N

__all__ = ["N"]
