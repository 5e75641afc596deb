"""The web app: ``python -m it3d.app`` (Gradio) -- one photo in, a 3D asset out (see :mod:`it3d.app.ui`)."""
