"""Shared pytest setup. Fixtures live in tests/fixtures/, one module per concern."""

pytest_plugins = [
    "tests.fixtures.users",
    "tests.fixtures.cluster",
    "tests.fixtures.tmpfs",
    "tests.fixtures.lastgood",
]
