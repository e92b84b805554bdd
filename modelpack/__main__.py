"""`python -m modelpack ...`: see modelpack.pack."""
import sys

from modelpack.pack import main

if __name__ == "__main__":
    sys.exit(main())
