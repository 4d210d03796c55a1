"""Test agent: prints to both streams and exits with the code it is given."""

import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--task", default="0")
args = parser.parse_args()
print("to stdout")
print("to stderr", file=sys.stderr)
sys.exit(int(args.task))
