"""The command line: a click group and one thin file per command."""
