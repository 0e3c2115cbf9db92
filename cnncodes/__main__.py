"""``python -m cnncodes`` runs the command line."""

from .cli import run

run()
