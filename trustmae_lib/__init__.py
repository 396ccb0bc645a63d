"""TrustMAE reproduced."""

__version__ = "0.1.0"
