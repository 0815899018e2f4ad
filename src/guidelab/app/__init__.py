"""The application layer: sampling jobs, sweeps, the digits evaluation, the HTML report, the demo, the
digits-classifier cache and the command line. It imports the core (``guidelab.*``); the core never
imports it (tests/test_layers.py). See docs/ARCHITECTURE.md."""
