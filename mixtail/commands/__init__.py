"""The commands of `mixtail` that have more than a few lines of argument handling, one module each; mixtail/cli.py
dispatches to their `main(argv)`. Library modules hold no command-line code."""
