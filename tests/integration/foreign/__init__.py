"""Milters nobody here wrote, run by tests/integration/test_foreign_milters.py."""
