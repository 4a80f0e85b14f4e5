"""`python -m gpt2x.sweep`: the command; its work is gpt2x.lab.sweep's."""

import sys

from gpt2x.lab.sweep import main

if __name__ == "__main__":
    sys.exit(main())
