"""The former name of report.py, kept so that earlier command lines still work: `python compare.py RUN_DIR [...]`
prints the report's table (see `python report.py --help`)."""
import sys

from report import main

if __name__ == "__main__":
    sys.exit(main())
