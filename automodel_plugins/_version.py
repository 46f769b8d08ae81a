"""The package version, a leaf module so that any floor (the hub client's user agent, the CLI) can import it."""

__version__ = "0.2.0"
