"""Unified Procedure Step worklists (IHE AIW-I): radnode's provider (UPS-RS, DIMSE) and its task performer."""
