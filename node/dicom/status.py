"""The C-STORE statuses radnode answers on every receive path (PS3.4 Annex B, pynetdicom's storage service);
STOW-RS reports the same codes as Failure Reasons."""

from __future__ import annotations


class Status:
    """C-STORE statuses we answer."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk full, database down
    TOO_LARGE = 0xA701  # refused: out of resources (instance over the configured limit)
    SOP_CLASS_MISMATCH = 0xA900  # data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC210  # cannot decode the data set
    INVALID_UID = 0xC211  # a UID is not a valid DICOM UID
