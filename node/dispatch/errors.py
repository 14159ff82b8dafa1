"""The error every sender raises for a failed delivery attempt."""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery attempt failed. `permanent` errors (configuration, a message the peer will never take) are not
    retried."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
