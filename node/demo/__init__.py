"""The demo: a synthetic chest CT phantom sent through a running node, results compared with its truth."""
