"""The store contract suite: every test here runs against every store in ``STORES``."""
