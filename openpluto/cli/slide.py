"""CLI sub-commands (placeholder until its stage lands)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands."""
