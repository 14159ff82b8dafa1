"""Route: the rules (and the packaged default rules) and the router that turns complete series into jobs."""
