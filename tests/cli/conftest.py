"""The loopback hub's fixtures (tests/hub_models.py) for the tests of fetching hub models."""

from tests.hub_models import hub, hub_repos  # noqa: F401  (fixtures)
