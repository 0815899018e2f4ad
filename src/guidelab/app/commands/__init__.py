"""Extra ``guidelab`` commands, one module each.

Every module here registers itself on the command group (``from ..cli import main`` then
``@main.command(...)``); :mod:`guidelab.app.cli` imports them all when it is loaded, so a new command is
one new file and no edit elsewhere.
"""
