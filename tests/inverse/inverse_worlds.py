"""Constants shared by the tests/inverse files (the fixtures are in conftest.py)."""

from guidelab import schedules

N = 256  # samples per method run
SIGMAS = schedules.karras(24, 0.002, 5.0)  # one budget for every method
