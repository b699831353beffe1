"""Coverage-guided fuzzing (atheris): the targets of targets.py, run by python -m tests.fuzz."""
