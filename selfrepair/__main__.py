"""`python -m selfrepair` is the `selfrepair` command."""

from selfrepair.cli import main

main()
