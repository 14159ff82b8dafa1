"""`python -m node.cli`: the radnode command line."""

from node.cli.main import app

app()
