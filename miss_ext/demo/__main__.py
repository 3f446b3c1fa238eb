"""python -m miss_ext.demo: fine-tune all-MiniLM-L6-v2 with MiSS and LoRA (--help for options)."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
