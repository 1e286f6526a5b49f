"""Errors RadFL raises on purpose. Each message names the bad argument, key, site or file."""


class RadFLError(Exception):
    """Base class of every error RadFL raises on purpose."""


class ConfigError(RadFLError, ValueError):
    """A run or node configuration key is unknown, missing or has a bad value."""


class RegistryError(RadFLError, KeyError):
    """A name is unknown to a registry, or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
