"""Test agent: stays alive, doing nothing, until it is killed."""

import time

time.sleep(300)
