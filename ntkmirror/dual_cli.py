"""CLI commands of the NTK-dual research harness (dual-diagnose, fit-dual, secant)."""


def register(app) -> None:
    """Add the research commands to the `ntkmirror` Typer app."""
