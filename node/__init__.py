"""radnode: the service core (receive, persist, track; later route, encode, dispatch)."""

__version__ = "0.1.0"
