"""The command line: ``kdcore train | demo | capture | plugins | list | new-plugin``.

- :mod:`~kdcore.cli.commands`: the parser and each command (:func:`main`, :func:`run`);
- :mod:`~kdcore.cli.demo`: ``kdcore demo`` and the table helpers plugin demos share;
- :mod:`~kdcore.cli.scaffold`: ``kdcore new-plugin``, rendering the files under ``kdcore/cli/templates/``.

Layer 5 (the top): may import everything below.
"""

from kdcore.cli.commands import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
