"""Receive and persist: the DICOM SCP, pull from a PACS, the instance store and the series tracker."""
