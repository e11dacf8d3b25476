"""Benchmarks that publish the README's numbers; each module says the command that runs it."""
