"""pruned: keep batch compute nodes clean of what jobs leave behind."""

__version__ = "0.1.0"
