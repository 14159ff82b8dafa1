"""Encode step: a plugin's Findings become files under <data dir>/outputs/<job id>/ (DICOM objects come next)."""
