"""Thin shim so `python cli.py ...` works from a checkout; the CLI lives in moe_local/cli.py."""

from moe_local.cli import main

if __name__ == "__main__":
    main()
