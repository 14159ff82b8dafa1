"""The radnode command line (typer)."""
