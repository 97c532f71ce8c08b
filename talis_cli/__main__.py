"""`python -m talis_cli` runs the `talis` command."""

from talis_cli.cli import main

main()
