"""payswitch: a declarative routing sidecar proxy for payment traffic."""

__version__ = "0.1.0"
