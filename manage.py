#!/usr/bin/env python
"""Ops entry point: ``python manage.py --help``."""

import sys

from rules_service.cli import main

if __name__ == "__main__":
    sys.exit(main())
