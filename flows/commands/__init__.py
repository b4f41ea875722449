"""The commands of ``beamline-inn`` (:mod:`flows.cli`), one module per group: each command's
``add_*`` function adds its parser, whose ``run`` default is the command's handler.

- :mod:`~flows.commands.scans`: ``demo``, ``reprocess``, ``reprocess-scans``, ``online``;
- :mod:`~flows.commands.results`: ``show``, ``salvage``;
- :mod:`~flows.commands.services`: ``worker``, ``serve``, ``keys``;
- :mod:`~flows.commands.model`: ``train``, ``validate``, ``reference``;
- :mod:`~flows.commands.instrument`: ``instrument``;
- :mod:`~flows.commands.arguments` and :mod:`~flows.commands.console`: what they share.

The modules import only the standard library when loaded; a handler imports what it needs.
"""
