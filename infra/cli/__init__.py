"""The `ragbus` command line."""
