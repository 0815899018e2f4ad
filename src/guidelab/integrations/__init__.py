"""Bridges to other libraries' models. ``guidelab.integrations.diffusers`` needs the ``diffusers`` package
(imported only when that submodule is imported)."""
