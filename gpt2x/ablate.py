"""`python -m gpt2x.ablate`: the command; its work is gpt2x.lab.ablate's."""

import sys

from gpt2x.lab.ablate import main

if __name__ == "__main__":
    sys.exit(main())
