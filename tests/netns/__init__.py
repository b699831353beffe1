"""Scenarios on test hosts (tests/hosts.py): each module runs in namespaces of its own,
started by a process test through ``tests.hosts.run_scenario``."""
