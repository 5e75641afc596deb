"""User-facing errors: launch.py prints these as one line and exits non-zero."""


class It3dError(Exception):
    """Base of every error whose message is meant for the person running it3d."""


class ConfigError(It3dError, ValueError):
    """A configuration problem; the message names the dotted key."""
