"""User-facing errors: launch.py prints these as one line and exits non-zero."""


class It3dError(Exception):
    """Base of every error whose message is meant for the person running it3d."""
