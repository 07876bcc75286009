"""The command line edge: parses input, calls the library, renders output. Thin by design."""
