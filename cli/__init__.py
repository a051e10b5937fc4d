"""The `vpr` command: a thin layer; each subcommand parses its arguments and
calls one function of the package that owns the work."""
