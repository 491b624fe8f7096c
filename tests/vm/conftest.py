"""The host's pytest (`pytest tests`) must not collect tests/vm/scenarios: those run inside
the VM lane's guests only (bash tests/vm/run.sh)."""

collect_ignore = ["scenarios"]
