"""`python -m qvlsearch` runs the command-line tool."""

from .cli import main

main()
