"""What each ``medanomaly`` command does, one module per verb: :mod:`.train`, :mod:`.evaluate`, :mod:`.predict`,
:mod:`.benchmark`, :mod:`.demo`, :mod:`.listing`; :mod:`.config` resolves parameters, :mod:`.datasets` opens data.

The CLI (:mod:`medanomaly.cli`) only parses options and prints; everything here is also a Python API. Nothing heavy
is imported at package import time, so ``medanomaly --help`` stays fast.
"""
