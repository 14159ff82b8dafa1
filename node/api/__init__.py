"""API step: the HTTP service (REST, DICOMweb STOW-RS, dashboard, metrics); see node/api/app.py."""
