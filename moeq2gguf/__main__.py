"""python -m moeq2gguf ...: the command line (also what torchrun starts)."""
import sys

from moeq2gguf.cli import main

sys.exit(main())
