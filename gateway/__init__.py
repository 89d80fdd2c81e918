"""avatar-gateway: one streaming avatar, many browsers."""

__version__ = "0.1.0"
