"""`python -m flows.cli`: what the `mtlrec` script runs."""

from flows.cli import main

main()
