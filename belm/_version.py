"""belm's version (a leaf module: the CLI and the package both read it)."""

__version__ = "0.1.0"
