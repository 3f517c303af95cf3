"""`python -m mixtail ...` (and `torchrun -m mixtail ...`) is the same as the `mixtail` command."""

from mixtail.cli import main

main()
