"""`python -m gpt2x.report`: the command; its work is gpt2x.lab.report's."""

import sys

from gpt2x.lab.report import main

if __name__ == "__main__":
    sys.exit(main())
