"""Benchmarks behind `cairl bench`; side-by-side comparisons live in benchmarks/."""
