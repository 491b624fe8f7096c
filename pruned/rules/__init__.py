"""Pure decisions: trust, classification, actions, cleanup plans. Nothing here does I/O.

Every function takes what was read (a snapshot, a job view, a policy) and returns records;
the layering test (tests/unit/test_layers.py) keeps this package free of any I/O module.
"""
