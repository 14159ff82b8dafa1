"""Dispatch: deliver result objects to each destination kind (DICOM C-STORE, STOW-RS, Orthanc), and the SCU."""
