"""The `ermgap` command line: thin wrappers over the library API."""
