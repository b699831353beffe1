"""``python -m gateway``: the zkv HTTP gateway; ``--help`` lists the flags and their variables."""

from gateway.server import main

if __name__ == "__main__":
    raise SystemExit(main())
