"""`python -m mailflow`: the same command line as the `mailflow` script."""
from mailflow.cli import main

main()
