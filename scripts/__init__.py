"""The development scripts. A package so that ``scripts.kit`` (what they share with the tests) is
imported by one name everywhere: the tests import it with the repository root on ``sys.path`` (as
pytest puts it there), and every script puts the root there first."""
