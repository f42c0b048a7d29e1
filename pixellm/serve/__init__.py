"""PixelLM on Ray Serve: the HTTP application (``app``), its API (``api``), model loading from a
directory or the MLflow registry (``loading``) and batch scoring through the deployment (``score``).

Import the submodules directly (``from pixellm.serve.app import build_app``); this package imports
nothing, so ``pixellm.serve.api`` stays usable without Ray.
"""
