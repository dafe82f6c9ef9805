"""`python -m keras_sie`: the `keras-sie` command line."""

import sys

from keras_sie.cli import main

if __name__ == "__main__":
    sys.exit(main())
