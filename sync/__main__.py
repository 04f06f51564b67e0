"""`python -m sync` runs the command line."""

from sync.cli import main

main()
