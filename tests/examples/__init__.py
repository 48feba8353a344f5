"""Tests of the filters in examples/ (harness, and the real runner where it matters)."""
